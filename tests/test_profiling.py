"""evf_testing.profiling: device time per model part from a jax.profiler trace, checked on CPU traces."""

from __future__ import annotations

import collections
import tempfile

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

from benchmarks.train_gpu import step_part
from evf_testing import profiling


class TwoLayers(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.gelu(nn.Dense(512, name="wide")(x))
    return nn.Dense(16, name="narrow")(x)


def _step():
  model, tx = TwoLayers(), optax.adamw(1e-3)

  def loss(params, x):
    return jnp.mean(model.apply({"params": params}, x) ** 2)

  def step(params, opt_state, x):
    g = jax.grad(loss)(params, x)
    updates, opt_state = tx.update(g, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = model.init(jax.random.key(0), jnp.ones((1, 256)))["params"]
  return jax.jit(step), params, tx.init(params), jax.random.normal(jax.random.key(1), (2048, 256))


def _layer(op_name):
  return next((p for p in ("wide", "narrow") if f"/{p}/" in op_name), "rest")


def test_a_cpu_trace_is_attributed_to_modules_and_passes():
  step, params, opt_state, x = _step()
  compiled = step.lower(params, opt_state, x).compile()
  jax.block_until_ready(compiled(params, opt_state, x))
  trace_dir = tempfile.mkdtemp()
  with jax.profiler.trace(trace_dir):
    for _ in range(3):
      params, opt_state = compiled(params, opt_state, x)
    jax.block_until_ready(params)
  text = compiled.as_text()
  names = profiling.op_names(text)
  times = profiling.op_times(profiling.load_trace(profiling.trace_file(trace_dir)), profiling.module_name(text))
  assert times and all(us >= 0 for us in times.values())
  r = profiling.attribute(times, names, _layer, per=3)
  assert r["ops_with_metadata"] >= 0.8 * r["ops_seen"], r
  got = {(row["part"], row["pass"]): row["ms"] for row in r["parts"]}
  # Both layers' products run in both passes (the kernels' gradients); the AdamW update is outside the gradient.
  for key in (("wide", "forward"), ("wide", "backward"), ("narrow", "forward"), ("narrow", "backward"),
              ("rest", "outside")):
    assert got.get(key, 0.0) > 0, (key, got)
  assert ("wide", "outside") not in got and ("narrow", "outside") not in got
  assert sum(row["share"] for row in r["parts"]) == pytest.approx(1.0)
  assert sum(r["passes_ms"].values()) == pytest.approx(r["device_ms"])
  forward_product = [row for row in r["top_ops"] if row["op_name"].endswith("jvp(TwoLayers)/wide/dot_general")]
  assert len(forward_product) == 1 and forward_product[0]["ms"] > 0
  assert [row["ms"] for row in r["top_ops"]] == sorted((row["ms"] for row in r["top_ops"]), reverse=True)


def test_instructions_without_metadata_take_their_fusion_s_or_operand_s():
  text = """HloModule jit_f, entry_computation_layout={(f32[4]{0})->f32[4]{0}}

%fused_computation (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %e = f32[4]{0} exponential(%p), metadata={op_name="jit(f)/jvp(M)/inner/exp"}
  ROOT %n = f32[4]{0} negate(%e), metadata={op_name="jit(f)/jvp(M)/inner/neg"}
}

ENTRY %main.1 (x: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0), metadata={op_name="x"}
  %copy.1 = f32[4]{0} copy(%x)
  %neg_fusion.2 = f32[4]{0} fusion(%copy.1), kind=kLoop, calls=%fused_computation
  ROOT %copy.3 = f32[4]{0} copy(%neg_fusion.2)
}
"""
  assert profiling.module_name(text) == "jit_f"
  assert profiling.instructions(text) == {"p", "e", "n", "x", "copy.1", "neg_fusion.2", "copy.3"}
  names = profiling.op_names(text)
  assert names["neg_fusion.2"] == names["copy.3"] == "jit(f)/jvp(M)/inner/neg"
  assert "x" not in names and "copy.1" not in names  # a parameter's op_name names an argument, not an op


def test_nested_events_count_their_exclusive_time():
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
          {"ph": "M", "name": "thread_name", "pid": 1, "tid": 7, "args": {"name": "worker"}}]

  def op(name, ts, dur, module="m"):
    return {"ph": "X", "pid": 1, "tid": 7, "ts": ts, "dur": dur, "name": name,
            "args": {"hlo_op": name, "hlo_module": module}}

  events = meta + [op("while.1", 0, 100), op("body.1", 10, 30), op("body.2", 50, 20), op("after", 120, 5),
                   op("elsewhere", 0, 1000, module="other")]
  assert profiling.op_times(events, "m") == {"while.1": 50, "body.1": 30, "body.2": 20, "after": 5}


def test_gpu_traces_count_stream_lines_only():
  meta = [{"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "Stream #13(Compute)"}},
          {"ph": "M", "name": "thread_name", "pid": 2, "tid": 2, "args": {"name": "XLA Ops"}}]
  kernel = {"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 40, "name": "loop_fusion_3",
            "args": {"hlo_op": "loop_fusion.3", "hlo_module": "jit_step"}}
  derived = dict(kernel, tid=2, dur=45)
  assert profiling.op_times(meta + [kernel, derived], "jit_step") == {"loop_fusion.3": 40}
  # Kernels that name their op but not their module count when the op is one of the module's instructions.
  bare = [dict(kernel, args={"hlo_op": "loop_fusion.3"}), dict(kernel, ts=50, args={"hlo_op": "gemm.9"})]
  assert profiling.op_times(meta + bare, "jit_step") == {}
  assert profiling.op_times(meta + bare, "jit_step", instructions={"loop_fusion.3"}) == {"loop_fusion.3": 40}


@pytest.mark.parametrize("op_name, part, pass_", [
    ("jit(step)/jvp(EvfSam.embed_image)/sam.embed_image/image_encoder/checkpoint/blocks_0/add", "SAM image encoder",
     "forward"),
    ("jit(step)/transpose(jvp(EvfSam.text_prompts))/beit3/encoder/layers_0/ffn/dot_general", "BEiT-3", "backward"),
    ("jit(step)/transpose(jvp(EvfSam.text_prompts))/projector/fc1/dot_general", "projector", "backward"),
    ("jit(step)/jvp(EvfSam.decode)/sam.decode/mask_decoder/transformer/add", "SAM prompt encoder + mask decoder",
     "forward"),
    ("jit(step)/transpose(jvp(hk,nkl,wl->nhw))/dot_general", "upsampling to the loss size", "backward"),
    ("jit(step)/jvp(jit(log_sigmoid))/jit(softplus)/exp", "loss", "forward"),
    ("jit(step)/transpose(jvp(jit(log_sigmoid)))/jit(softplus)/mul", "loss", "backward"),
    ("jit(step)/mul", "optimizer update and norms", "outside"),
])
def test_training_step_parts(op_name, part, pass_):
  assert step_part(op_name) == part and profiling.pass_of(op_name) == pass_


def test_exclusive_time_with_a_shared_start_a_touching_end_and_two_threads():
  """A loop and its first thunk starting in the same microsecond (listed child first), a thunk starting as the
  loop ends, and another worker thread's thunk overlapping them: none of these nest in each other."""
  meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}}]

  def op(name, ts, dur, tid=7):
    return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": name,
            "args": {"hlo_op": name, "hlo_module": "m"}}

  events = meta + [op("body.3", 0, 40), op("while.2", 0, 100), op("next", 100, 10), op("other", 20, 50, tid=8)]
  assert profiling.op_times(events, "m") == {"while.2": 60, "body.3": 40, "next": 10, "other": 50}


def test_another_module_s_op_of_the_same_name_does_not_count():
  meta = [{"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
          {"ph": "M", "name": "thread_name", "pid": 2, "tid": 1, "args": {"name": "Stream #13(Compute)"}}]
  ours = {"ph": "X", "pid": 2, "tid": 1, "ts": 0, "dur": 40, "name": "f", "args": {"hlo_op": "fusion.3",
                                                                                  "hlo_module": "jit_step"}}
  theirs = dict(ours, ts=50, dur=7, args={"hlo_op": "fusion.3", "hlo_module": "jit_convert"})  # names repeat
  assert profiling.op_times(meta + [ours, theirs], "jit_step", instructions={"fusion.3"}) == {"fusion.3": 40}


def test_an_instruction_s_own_metadata_wins_and_otherwise_its_first_operand_s():
  text = """HloModule jit_g, entry_computation_layout={(f32[4]{0}, f32[4]{0})->f32[4]{0}}

%fused_add (p0: f32[4], p1: f32[4]) -> f32[4] {
  %p0 = f32[4]{0} parameter(0)
  %p1 = f32[4]{0} parameter(1)
  ROOT %a = f32[4]{0} add(%p0, %p1), metadata={op_name="jit(g)/jvp(M)/inner/add"}
}

ENTRY %main.2 (x: f32[4], y: f32[4]) -> f32[4] {
  %x = f32[4]{0} parameter(0), metadata={op_name="x"}
  %y = f32[4]{0} parameter(1), metadata={op_name="y"}
  %e = f32[4]{0} exponential(%x), metadata={op_name="jit(g)/jvp(M)/first/exp"}
  %t = f32[4]{0} tanh(%y), metadata={op_name="jit(g)/jvp(M)/second/tanh"}
  %m = f32[4]{0} multiply(%e, %t)
  ROOT %add_fusion = f32[4]{0} fusion(%m, %t), kind=kLoop, calls=%fused_add, metadata={op_name="jit(g)/own/add"}
}
"""
  names = profiling.op_names(text)
  assert names["m"] == "jit(g)/jvp(M)/first/exp"
  assert names["add_fusion"] == "jit(g)/own/add"


def test_attribute_in_ms_per_step_with_unattributed_time_kept_apart():
  # 6 ms of device time over 2 steps: a forward product, its backward, and a copy without metadata.
  long_name = "jit(step)/jvp(M)/" + "deep/" * 40 + "a/dot"
  times = collections.Counter({"fusion.1": 3000, "copy.9": 2000, "fusion.2": 1000})
  names = {"fusion.1": long_name, "fusion.2": "jit(step)/transpose(jvp(M))/a/dot", "constant.4": "jit(step)/b"}

  def part_of(op_name):  # as step_part: anything it does not know is the optimizer's
    return "a" if "/a/" in op_name else "optimizer"

  r = profiling.attribute(times, names, part_of, per=2, top=2)
  assert r["device_ms"] == pytest.approx(3.0)
  assert r["passes_ms"] == pytest.approx({"forward": 1.5, "outside": 1.0, "backward": 0.5})
  assert [(row["part"], row["pass"]) for row in r["parts"]] == [("a", "forward"), ("unattributed", "outside"),
                                                                 ("a", "backward")]
  assert [row["ms"] for row in r["parts"]] == pytest.approx([1.5, 1.0, 0.5])
  assert [row["share"] for row in r["parts"]] == pytest.approx([1 / 2, 1 / 3, 1 / 6])
  assert [(row["op"], row["ms"]) for row in r["top_ops"]] == [("fusion.1", 1.5), ("copy.9", 1.0)]
  op_name = r["top_ops"][0]["op_name"]  # the tail names the module
  assert len(op_name) == 160 and op_name.endswith("/deep/a/dot")
  assert r["ops_seen"] == 3 and r["ops_with_metadata"] == 2  # constant.4 never ran


def test_one_trace_file_is_expected(tmp_path):
  for run in ("run1", "run2"):
    (tmp_path / "plugins" / run).mkdir(parents=True)
    (tmp_path / "plugins" / run / "host.trace.json.gz").write_bytes(b"")
  with pytest.raises(ValueError, match="found 2"):
    profiling.trace_file(str(tmp_path))
  assert profiling.trace_file(str(tmp_path / "plugins" / "run1")).endswith("run1/host.trace.json.gz")
