"""benchmarks/train_compile.py: its reading of compiled HLO (collectives, their bytes, loop trip counts) and its
errors here. Compiling for a TPU slice or for GPUs needs libtpu (scripts/setup_static_env.sh tpu) or jax's CUDA
plugin (scripts/setup_static_env.sh gpu), which the test environment does not have on purpose: those tests are
in the slow tier and skip where the environment is missing."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import re
import subprocess
import sys
import types

import pytest

from benchmarks import deviceless, train_compile

ROOT = pathlib.Path(__file__).resolve().parents[1]

# A compiled program as XLA prints it: an all-gather in a loop of 10 (FSDP weights gathered per microbatch), an
# async all-reduce over TPU-style mesh groups, an async collective-permute (its start's tuple holds the operand
# and context, not only the result) and a reduce-scatter wrapped in async-start (as on GPUs).
HLO = """HloModule jit_step, is_scheduled=true, num_partitions=8

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%body (p: (s32[], bf16[4,256])) -> (s32[], bf16[4,256]) {
  %p = (s32[], bf16[4,256]{1,0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], bf16[4,256]{1,0}) %p), index=0
  %w = bf16[4,256]{1,0:T(8,128)(2,1)} get-tuple-element(%p), index=1
  %ag = bf16[32,256]{1,0:T(8,128)(2,1)} all-gather(bf16[4,256]{1,0} %w), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}
  ROOT %t = (s32[], bf16[4,256]{1,0}) tuple(%i, %w)
}

%cond (p: (s32[], bf16[4,256])) -> pred[] {
  %p = (s32[], bf16[4,256]{1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

%rs.wrapped (a: f32[64]) -> f32[8] {
  %a = f32[64]{0} parameter(0)
  ROOT %rs = f32[8]{0} reduce-scatter(f32[64]{0} %a), channel_id=3, replica_groups={{0,1,2,3,4,5,6,7}}, dimensions={0}, to_apply=%add
}

ENTRY %main.9 (w: bf16[4,256], g: f32[64]) -> f32[8] {
  %w = bf16[4,256]{1,0} parameter(0)
  %g = f32[64]{0} parameter(1)
  %init = (s32[], bf16[4,256]{1,0}) tuple(%w, %w)
  %loop = (s32[], bf16[4,256]{1,0}) while((s32[], bf16[4,256]{1,0}) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"10"}}
  %g2 = f32[1024]{0} broadcast(%g), dimensions={}
  %ars = f32[1024]{0} all-reduce-start(f32[1024]{0} %g2), channel_id=2, replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_1'}, to_apply=%add
  %ard = f32[1024]{0} all-reduce-done(f32[1024]{0} %ars)
  %cps = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(f32[16]{0} %x), channel_id=4, source_target_pairs={{0,1},{1,0}}
  %cpd = f32[16]{0} collective-permute-done((f32[16]{0}, f32[16]{0}, u32[], u32[]) %cps)
  %rss = ((f32[64]{0}), f32[8]{0}) async-start(f32[64]{0} %g), calls=%rs.wrapped
  ROOT %rsd = f32[8]{0} async-done(((f32[64]{0}), f32[8]{0}) %rss)
}
"""


def test_shape_bytes():
  assert train_compile.shape_bytes("bf16[8,128]{1,0:T(8,128)(2,1)}") == 2048
  assert train_compile.shape_bytes("(f32[16]{0}, s8[4,4]{1,0}, pred[3], u32[])") == 64 + 16 + 3 + 4
  assert train_compile.shape_bytes("f8e4m3fn[10]") == 10 and train_compile.shape_bytes("s4[8]") == 4
  assert train_compile.shape_bytes("f32[]") == 4


def test_collective_traffic_counts_loops_async_pairs_and_groups():
  traffic = train_compile.collective_traffic(HLO, devices=8)
  assert {op: t["ops"] for op, t in traffic.items()} == deviceless.collectives(HLO)
  assert traffic["all-gather"] == {"ops": 1, "per_step": 10, "result_bytes": 10 * 32 * 256 * 2,
                                   "link_bytes": 10 * 32 * 256 * 2 * 7 // 8}
  assert traffic["all-reduce"] == {"ops": 1, "per_step": 1, "result_bytes": 4096, "link_bytes": 2 * 4096 * 3 // 4}
  assert traffic["collective-permute"] == {"ops": 1, "per_step": 1, "result_bytes": 64, "link_bytes": 64}
  assert traffic["reduce-scatter"] == {"ops": 1, "per_step": 1, "result_bytes": 32, "link_bytes": 32 * 7}
  assert "unknown_trip_counts" not in traffic


# How XLA:TPU prints two collectives (shapes made small). An FSDP weight's all-gather overlapped with compute is
# split into a start fusion, continuation fusions (each fused with other work) and a done fusion, each holding a
# copy of the same all-gather (one channel_id): one all-gather. A reduce-scatter is a fusion
# (AllReduceScatterFusion) whose body all-reduces the whole input and keeps this device's slice: one
# reduce-scatter of the fusion's result. Its groups are mesh axes after a device order (device_ids).
TPU_HLO = """HloModule jit_step, is_scheduled=true, num_partitions=16

%add (x: bf16[], y: bf16[]) -> bf16[] {
  %x = bf16[] parameter(0)
  %y = bf16[] parameter(1)
  ROOT %sum = bf16[] add(%x, %y)
}

%fused_computation.1 (param_0.1: bf16[1,2,64]) -> (bf16[1,2,64], bf16[16,2,64], s32[2]) {
  %param_0.1 = bf16[1,2,64]{2,1,0:T(2,128)(2,1)} parameter(0)
  %all-gather.1 = bf16[16,2,64]{2,1,0:T(2,128)(2,1)} all-gather(%param_0.1), channel_id=33, replica_groups=mesh['axis_0'=16,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true, frontend_attributes={chain_id="7"}, metadata={op_name="jit(step)/beit3/fc1/dot_general"}
  %ids = s32[2]{0} constant({0, 1})
  ROOT %t = (bf16[1,2,64]{2,1,0}, bf16[16,2,64]{2,1,0}, s32[2]{0}) tuple(%param_0.1, %all-gather.1, %ids)
}

%async_collective_fusion.2 (param_0.2: bf16[1,2,64], param_1.2: bf16[16,2,64], param_2.2: bf16[3,5,32]) -> (bf16[3,5,32], bf16[16,2,64]) {
  %param_0.2 = bf16[1,2,64]{2,1,0} parameter(0)
  %param_2.2 = bf16[3,5,32]{2,1,0} parameter(2)
  %neg.2 = bf16[3,5,32]{2,1,0} negate(%param_2.2), metadata={op_name="jit(step)/beit3/q_proj/neg"}
  %all-gather.2 = bf16[16,2,64]{2,1,0:T(2,128)(2,1)S(1)} all-gather(%param_0.2), channel_id=33, replica_groups=mesh['axis_0'=16,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true, frontend_attributes={chain_id="7"}, metadata={op_name="jit(step)/beit3/fc1/dot_general"}
  ROOT %t = (bf16[3,5,32]{2,1,0}, bf16[16,2,64]{2,1,0}) tuple(%neg.2, %all-gather.2)
}

%fused_computation.3 (param_0.3: bf16[1,2,64], param_1.3: bf16[16,2,64]) -> bf16[16,2,64] {
  %param_0.3 = bf16[1,2,64]{2,1,0} parameter(0)
  ROOT %all-gather.3 = bf16[16,2,64]{2,1,0:T(2,128)(2,1)} all-gather(%param_0.3), channel_id=33, replica_groups=mesh['axis_0'=16,'axis_1'=1] {'axis_0'}, dimensions={0}, use_global_device_ids=true, frontend_attributes={chain_id="7"}, metadata={op_name="jit(step)/beit3/fc1/dot_general"}
}

%all-reduce-scatter.4 (input_0: bf16[1024,64]) -> bf16[256,64] {
  %input_0 = bf16[1024,64]{1,0} parameter(0)
  %all-reduce.4 = (bf16[1024,64]{1,0}) all-reduce(%input_0), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7},{8,9,10,11},{12,13,14,15}}, use_global_device_ids=true, to_apply=%add
  %gte.4 = bf16[1024,64]{1,0} get-tuple-element(%all-reduce.4), index=0
  %pid = u32[] partition-id()
  %zero = u32[] constant(0)
  ROOT %slice.4 = bf16[256,64]{1,0} dynamic-slice(%gte.4, %pid, %zero), dynamic_slice_sizes={256,64}
}

%all-reduce-scatter.5 (input_0.5: bf16[1024,64]) -> bf16[256,64] {
  %input_0.5 = bf16[1024,64]{1,0} parameter(0)
  %all-reduce.5 = (bf16[1024,64]{1,0}) all-reduce(%input_0.5), channel_id=1, replica_groups={{0,1,2,3},{4,5,6,7},{8,9,10,11},{12,13,14,15}}, use_global_device_ids=true, to_apply=%add
  %gte.5 = bf16[1024,64]{1,0} get-tuple-element(%all-reduce.5), index=0
  %pid.5 = u32[] partition-id()
  %zero.5 = u32[] constant(0)
  ROOT %slice.5 = bf16[256,64]{1,0} dynamic-slice(%gte.5, %pid.5, %zero.5), dynamic_slice_sizes={256,64}
}

ENTRY %main (w: bf16[1,2,64], x: bf16[3,5,32], g: bf16[1024,64], h: bf16[1024,64], e: f32[64,8]) -> (bf16[16,2,64], bf16[256,64], bf16[256,64], f32[64,8]) {
  %w = bf16[1,2,64]{2,1,0} parameter(0)
  %x = bf16[3,5,32]{2,1,0} parameter(1)
  %g = bf16[1024,64]{1,0} parameter(2)
  %h = bf16[1024,64]{1,0} parameter(3)
  %e = f32[64,8]{1,0} parameter(4)
  %async-collective-start.7 = (bf16[1,2,64]{2,1,0}, bf16[16,2,64]{2,1,0}, s32[2]{0}) fusion(%w), kind=kCustom, calls=%fused_computation.1
  %buf = bf16[16,2,64]{2,1,0} get-tuple-element(%async-collective-start.7), index=1
  %fusion.2 = (bf16[3,5,32]{2,1,0}, bf16[16,2,64]{2,1,0}) fusion(%w, %buf, %x), kind=kOutput, calls=%async_collective_fusion.2, backend_config={"async_collective_fusion_config":{"flag_start":"2","flag_end":"8"}}
  %buf2 = bf16[16,2,64]{2,1,0} get-tuple-element(%fusion.2), index=1
  %async-collective-done.7 = bf16[16,2,64]{2,1,0} fusion(%w, %buf2), kind=kCustom, calls=%fused_computation.3
  %rs.4 = bf16[256,64]{1,0} fusion(%g), kind=kCustom, calls=%all-reduce-scatter.4, metadata={op_name="jit(step)/transpose(beit3/fc1/dot_general)"}, backend_config={"collective_algorithm_config":{"emitter":"AllReduceScatterFusion","strategy":"StrategyRing"}}
  %rs.5 = bf16[256,64]{1,0} fusion(%h), kind=kCustom, calls=%all-reduce-scatter.5, metadata={op_name="jit(step)/transpose(beit3/fc2/dot_general)"}, backend_config={"collective_algorithm_config":{"emitter":"AllReduceScatterFusion","strategy":"StrategyRing"}}
  %ar = f32[64,8]{1,0} all-reduce(%e), channel_id=9, replica_groups=mesh['axis_0'=4,'axis_1'=4], device_ids=([4,4]T(1,0)) {'axis_0'}, use_global_device_ids=true, to_apply=%add
  ROOT %out = (bf16[16,2,64]{2,1,0}, bf16[256,64]{1,0}, bf16[256,64]{1,0}, f32[64,8]{1,0}) tuple(%async-collective-done.7, %rs.4, %rs.5, %ar)
}
"""


def test_split_tpu_collectives_count_once_and_scatters_as_scatters():
  traffic = train_compile.collective_traffic(TPU_HLO, devices=16)
  gathered = 16 * 2 * 64 * 2
  assert traffic["all-gather"] == {"ops": 1, "per_step": 1, "result_bytes": gathered,
                                   "link_bytes": gathered * 15 // 16}
  shard = 256 * 64 * 2  # each device keeps a quarter of the gradient: its group holds 4 devices
  assert traffic["reduce-scatter"] == {"ops": 2, "per_step": 2, "result_bytes": 2 * shard,
                                       "link_bytes": 2 * shard * 3}
  assert traffic["all-reduce"] == {"ops": 1, "per_step": 1, "result_bytes": 64 * 8 * 4,
                                   "link_bytes": 2 * 64 * 8 * 4 * 3 // 4}  # group: axis_0 of 4, not all 16
  top = train_compile.largest_collectives(TPU_HLO, devices=16)
  assert {(r["op"], r["source"]) for r in top if r["op"] != "all-reduce"} == {
      ("all-gather", "jit(step)/beit3/fc1/dot_general"),
      ("reduce-scatter", "jit(step)/transpose(beit3/fc1/dot_general)"),
      ("reduce-scatter", "jit(step)/transpose(beit3/fc2/dot_general)")}


def test_largest_collectives_name_their_source():
  hlo = HLO.replace("dimensions={0}\n  ROOT %t", 'dimensions={0}, metadata={op_name="jit(step)/beit3/fc1/dot_general"}\n  ROOT %t')
  top = train_compile.largest_collectives(hlo, devices=8, n=2)
  assert [(r["op"], r["shape"], r["per_step"]) for r in top] == [("all-gather", "bf16[32,256]", 10),
                                                                 ("all-reduce", "f32[1024]", 1)]
  assert top[0]["source"] == "jit(step)/beit3/fc1/dot_general" and top[0]["group"] == 8
  # Ranked by bytes sent, not by result: the reduce-scatter's 32-byte result sends 7 x 32, the permute its 64.
  assert [r["op"] for r in train_compile.largest_collectives(hlo, devices=8)] == [
      "all-gather", "all-reduce", "reduce-scatter", "collective-permute"]


def test_loop_without_trip_count_counts_once_and_says_so():
  hlo = HLO.replace(', backend_config={"known_trip_count":{"n":"10"}}', "")
  traffic = train_compile.collective_traffic(hlo, devices=8)
  assert traffic["all-gather"]["per_step"] == 1 and traffic["unknown_trip_counts"] == ["body"]


def test_trip_count_from_the_loop_condition():
  """TPU programs give no known_trip_count: lax.scan's and lax.map's loops run while `counter < N`."""
  hlo = HLO.replace(', backend_config={"known_trip_count":{"n":"10"}}', "").replace(
      "  ROOT %lt = pred[] constant(true)",
      "  %n = s32[]{:T(128)} constant(6)\n  %c = s32[] get-tuple-element(%p), index=0\n"
      "  ROOT %lt = pred[]{:T(512)} compare(%c, %n), direction=LT")
  traffic = train_compile.collective_traffic(hlo, devices=8)
  assert traffic["all-gather"]["per_step"] == 6 and "unknown_trip_counts" not in traffic


def test_loops_of_unknown_trip_count_are_the_ones_holding_collectives():
  """Every loop whose collectives count once is named (sorted), and only those: a loop without collectives changes
  no count. A condition other than `counter < N` gives no bound."""
  hlo = HLO.replace(', backend_config={"known_trip_count":{"n":"10"}}', "").replace(
      "  ROOT %lt = pred[] constant(true)",
      "  %n = s32[] constant(0)\n  %c = s32[] get-tuple-element(%p), index=0\n"
      "  ROOT %gt = pred[] compare(%c, %n), direction=GT")
  idle = ("%idle (q: (s32[], bf16[4,256])) -> (s32[], bf16[4,256]) {\n"
          "  ROOT %q = (s32[], bf16[4,256]{1,0}) parameter(0)\n}\n\n")
  second = ("%body2 (p: (s32[], bf16[4,256])) -> (s32[], bf16[4,256]) {\n"
            "  %p = (s32[], bf16[4,256]{1,0}) parameter(0)\n"
            "  %v = bf16[4,256]{1,0} get-tuple-element(%p), index=1\n"
            "  %ar2 = bf16[4,256]{1,0} all-reduce(%v), channel_id=7, replica_groups=[1,8]<=[8], to_apply=%add\n"
            "  ROOT %t = (s32[], bf16[4,256]{1,0}) tuple(%p)\n}\n\n")
  hlo = hlo.replace("ENTRY %main.9", idle + second + "ENTRY %main.9").replace(
      "  %g2 = ", "  %spin = (s32[], bf16[4,256]{1,0}) while(%init), condition=%cond, body=%idle\n"
      "  %loop2 = (s32[], bf16[4,256]{1,0}) while(%init), condition=%cond, body=%body2\n  %g2 = ")
  traffic = train_compile.collective_traffic(hlo, devices=8)
  assert traffic["unknown_trip_counts"] == ["body", "body2"]
  assert traffic["all-gather"]["per_step"] == 1 and traffic["all-reduce"]["per_step"] == 2


def test_computations_count_per_call():
  """A computation runs once per call site (two calls of one computation: its collective twice per step); one that
  nothing this parser reads calls still counts once rather than vanishing."""
  hlo = """HloModule m

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%reduce (a: f32[64]) -> f32[64] {
  %a = f32[64]{0} parameter(0)
  ROOT %ar = f32[64]{0} all-reduce(%a), channel_id=1, replica_groups=[1,4]<=[4], to_apply=%add
}

%orphan (b: f32[32]) -> f32[32] {
  %b = f32[32]{0} parameter(0)
  ROOT %cp = f32[32]{0} collective-permute(%b), channel_id=2, source_target_pairs={{0,1},{1,0}}
}

ENTRY %main (a: f32[64]) -> f32[64] {
  %a = f32[64]{0} parameter(0)
  %c1 = f32[64]{0} call(%a), to_apply=%reduce
  ROOT %c2 = f32[64]{0} call(%c1), to_apply=%reduce
}
"""
  traffic = train_compile.collective_traffic(hlo, devices=4)
  assert traffic["all-reduce"] == {"ops": 1, "per_step": 2, "result_bytes": 2 * 256, "link_bytes": 2 * 2 * 256 * 3 // 4}
  assert traffic["collective-permute"]["per_step"] == 1 and traffic["collective-permute"]["result_bytes"] == 128


def _compiled_on_8_cpus(fn, *shapes) -> str:
  """The HLO of `fn` under shard_map over 8 CPU devices (a mesh axis "x"), compiled here."""
  import jax
  from jax.sharding import NamedSharding, PartitionSpec as P
  if jax.device_count() < 8:
    pytest.skip("needs 8 devices")
  mesh = jax.make_mesh((8,), ("x",))
  split = NamedSharding(mesh, P("x"))
  step = jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(P("x"),) * len(shapes), out_specs=P(), check_vma=False),
                 in_shardings=(split,) * len(shapes))
  return step.lower(*(jax.ShapeDtypeStruct(s, "float32", sharding=split) for s in shapes)).compile().as_text()


def test_every_kind_in_nested_loops_of_a_compiled_program():
  """XLA's own text (CPU): each kind once in a scan of 3 inside a scan of 5 runs 15 times per step (the trip
  counts multiply), then an all-reduce once; bytes from each device's shapes (64 floats, a scatter keeps 8)."""
  import jax

  def fn(a):
    def outer(c, _):
      def inner(c, _):
        s = jax.lax.psum_scatter(c, "x", tiled=True)
        g = jax.lax.all_gather(s, "x", tiled=True)
        t = jax.lax.all_to_all(g.reshape(8, 8), "x", 0, 0, tiled=True).reshape(64)
        return jax.lax.ppermute(t, "x", [(i, (i + 1) % 8) for i in range(8)]) * 0.5, None
      return jax.lax.scan(inner, c, None, length=3)[0], None
    return jax.lax.psum(jax.lax.scan(outer, a, None, length=5)[0], "x")

  hlo = _compiled_on_8_cpus(fn, (8 * 64,))
  traffic = train_compile.collective_traffic(hlo, devices=8)
  full, shard = 64 * 4, 8 * 4
  assert traffic == {
      "all-gather": {"ops": 1, "per_step": 15, "result_bytes": 15 * full, "link_bytes": 15 * full * 7 // 8},
      "all-reduce": {"ops": 1, "per_step": 1, "result_bytes": full, "link_bytes": 2 * full * 7 // 8},
      "all-to-all": {"ops": 1, "per_step": 15, "result_bytes": 15 * full, "link_bytes": 15 * full * 7 // 8},
      "collective-permute": {"ops": 1, "per_step": 15, "result_bytes": 15 * full, "link_bytes": 15 * full},
      "reduce-scatter": {"ops": 1, "per_step": 15, "result_bytes": 15 * shard, "link_bytes": 15 * shard * 7}}
  assert deviceless.collectives(hlo) == {op: 1 for op in deviceless.COLLECTIVES}


def test_collectives_sharing_a_channel_in_one_computation_are_distinct():
  """Only the copies of a split TPU collective, each in its own computation, count once. XLA:CPU gives every
  collective of a shard_map channel_id=1: two gathers of one shape in one computation are two gathers, and one of
  another shape in a loop body is a third."""
  import jax
  import jax.numpy as jnp

  def fn(a, b, c):
    def body(x, _):
      return x + 1, jax.lax.all_gather(x, "x", tiled=True)
    looped = jax.lax.scan(body, c, None, length=3)[1].sum(0)
    return jnp.concatenate([jax.lax.all_gather(a, "x", tiled=True) * 2, jax.lax.all_gather(b, "x", tiled=True) + 1,
                            looped])

  hlo = _compiled_on_8_cpus(fn, (64,), (64,), (128,))
  traffic = train_compile.collective_traffic(hlo, devices=8)
  assert deviceless.collectives(hlo) == {"all-gather": 3}
  assert traffic["all-gather"] == {"ops": 3, "per_step": 5, "result_bytes": 2 * 64 * 4 + 3 * 128 * 4,
                                   "link_bytes": (2 * 64 * 4 + 3 * 128 * 4) * 7 // 8}
  two = ("ENTRY %m (a: f32[8], b: f32[8]) -> f32[64] {\n  %a = f32[8]{0} parameter(0)\n  %b = f32[8]{0} parameter(1)\n"
         "  %g1 = f32[64]{0} all-gather(%a), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}\n"
         "  %g2 = f32[64]{0} all-gather(%b), channel_id=1, replica_groups=[1,8]<=[8], dimensions={0}\n"
         "  ROOT %s = f32[64]{0} add(%g1, %g2)\n}")
  assert train_compile.collective_traffic(two, devices=8)["all-gather"]["ops"] == 2


def test_no_collectives():
  assert train_compile.collective_traffic("ENTRY %m (a: f32[4]) -> f32[4] {\n  ROOT %a = f32[4]{0} parameter(0)\n}",
                                          devices=4) == {}


# One slice's program of a multi-slice job: the gradient is reduced inside the slice, then its shard goes to the
# other slices through the DCN runtime as a host transfer (a `send` to "xla_megascale_runtime"), once per
# microbatch of a loop of 3; a plain host send (a callback's) is not DCN traffic.
MULTI_SLICE_HLO = """HloModule jit_step, is_scheduled=true, num_partitions=4

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(f32[] %x, f32[] %y)
}

%body (p: (s32[], f32[64,8,128])) -> (s32[], f32[64,8,128]) {
  %p = (s32[], f32[64,8,128]{2,1,0}) parameter(0)
  %g = f32[64,8,128]{2,1,0:T(8,128)} get-tuple-element(%p), index=1
  %tok = token[] after-all(), frontend_attributes={MegascaleRendezvousKeyName="all-reduce.2_0"}
  %send = (f32[64,8,128]{2,1,0:T(8,128)}, u32[], token[]) send(%g, %tok), channel_id=4, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="xla_megascale_runtime",_xla_host_transfer_rendezvous="all-reduce.2_0"}
  %send-done = token[] send-done(%send), channel_id=4, is_host_transfer=true
  ROOT %t = (s32[], f32[64,8,128]{2,1,0}) tuple(%p)
}

%cond (p: (s32[], f32[64,8,128])) -> pred[] {
  %p = (s32[], f32[64,8,128]{2,1,0}) parameter(0)
  ROOT %lt = pred[] constant(true)
}

ENTRY %main (g: f32[256,512]) -> f32[256,512] {
  %g = f32[256,512]{1,0} parameter(0)
  %ar = f32[256,512]{1,0} all-reduce(%g), channel_id=3, replica_groups={{0,1,2,3}}, to_apply=%add
  %init = (s32[], f32[64,8,128]{2,1,0}) tuple(%ar)
  %loop = (s32[], f32[64,8,128]{2,1,0}) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"3"}}
  %tok2 = token[] after-all()
  %cb = (f32[4]{0}, u32[], token[]) send(%x, %tok2), channel_id=9, is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name="tf_rendezvous"}
  ROOT %out = f32[256,512]{1,0} copy(%ar)
}
"""


def test_transfers_to_other_slices_are_counted_apart():
  traffic = train_compile.collective_traffic(MULTI_SLICE_HLO, devices=4)
  assert traffic["all-reduce"]["per_step"] == 1 and traffic["all-reduce"]["result_bytes"] == 256 * 512 * 4
  dcn = traffic[train_compile.DCN_SEND]
  assert dcn["ops"] == 1 and dcn["per_step"] == 3 and dcn["result_bytes"] == 3 * 64 * 8 * 128 * 4  # not the u32
  top = train_compile.largest_collectives(MULTI_SLICE_HLO, devices=4)
  assert [(c["op"], c["group"], c["shape"]) for c in top] == [(train_compile.DCN_SEND, None, "f32[64,8,128]"),
                                                             ("all-reduce", 4, "f32[256,512]")]


def test_group_sizes():
  size = train_compile._group_size
  assert size("x = f32[8] all-gather(f32[1] %a), replica_groups=[4,2]<=[8], dimensions={0}", 8) == 2
  assert size("x = f32[8] all-gather(f32[1] %a), replica_groups={{0,2},{1,3}}, dimensions={0}", 4) == 2
  assert size("x = f32[] all-reduce(%a), replica_groups=mesh['axis_0'=4,'axis_1'=8] {'axis_0','axis_1'}", 0) == 32
  assert size("x = f32[] all-reduce(%a), replica_groups={}, to_apply=%add", 16) == 16


def test_link_bytes():
  """The ring estimate per kind (an all-to-all keeps 1/group of its buffer), and nothing over a group of one."""
  link = train_compile._link_bytes
  assert link("all-to-all", 800, 8) == link("all-gather", 800, 8) == 700
  assert link("reduce-scatter", 100, 8) == link("all-reduce", 400, 8) == 700
  assert link("collective-permute", 64, 8) == 64
  assert [link(op, 64, 1) for op in deviceless.COLLECTIVES] == [0] * len(deviceless.COLLECTIVES)


def test_hbm_per_chip():
  """Per chip, in GiB (2**30): the longest device-kind prefix wins ("TPU v5 lite" is a v5e, not a v5p, whose kind
  is "TPU v5"), and a GPU's is the memory its XLA target describes (79 and 140 GiB, as performance.md reads)."""
  gib = 2 ** 30
  assert train_compile.hbm_bytes("TPU v5 lite") == 16 * gib and train_compile.hbm_bytes("TPU v5") == 95 * gib
  assert train_compile.hbm_bytes("TPU v5p") == 95 * gib and train_compile.hbm_bytes("TPU v4") == 32 * gib
  assert train_compile.hbm_bytes("TPU v6 lite") == 32 * gib and train_compile.hbm_bytes("cpu") is None
  for target, size in (("h100", 79), ("h200", 140)):
    hbm = train_compile.hbm_bytes("cpu", target)
    assert f"device_memory_size: {hbm}\n" in deviceless.TARGETS[target] and int(hbm / gib) == size


def test_parse_mesh():
  assert train_compile.parse_mesh("data=-1, fsdp=8,tensor=1") == (("data", -1), ("fsdp", 8), ("tensor", 1))
  for bad in ("data", "data=x", "=4", ""):
    with pytest.raises(ValueError):
      train_compile.parse_mesh(bad)


def test_imports_no_jax():
  """main() must set the compile-only environment before jax starts: the module itself imports no jax."""
  code = "import sys, benchmarks.train_compile; print(any(m == 'jax' or m.startswith('jax.') for m in sys.modules))"
  out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


@pytest.mark.parametrize("platform,needs", [("tpu", "setup_static_env.sh tpu"), ("gpu", "setup_static_env.sh gpu")])
def test_without_the_compiler_plugin(platform, needs, capsys):
  pytest.importorskip("jax")
  try:  # the test environment has neither, on purpose
    import libtpu  # noqa: F401
    pytest.skip("libtpu is installed here")
  except ImportError:
    pass
  try:
    import jax_plugins.xla_cuda12  # noqa: F401
    pytest.skip("jax's CUDA plugin is installed here")
  except ImportError:
    pass
  assert train_compile.main(["--platform", platform, "--model-preset", "tiny"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and needs in err[0]


@pytest.mark.parametrize("argv,message", [
    (["--attention", "cudnn"], "--attention cudnn is for --platform gpu"),
    (["--target", "h100"], "--target is for --platform gpu"),
    (["--platform", "gpu", "--attention", "cudnn", "--precision", "fp32"], "needs --precision bf16"),
    (["--mesh", "data8"], "expected NAME=SIZE"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--eval", "--eval-prompts", "0"], "--eval-prompts must be >= 1"),
    (["--config", "configs/train/nope.py"], "no such file"),
    (["--platform", "cpu"], "invalid choice"),
    (["--num-slices", "0"], "--num-slices must be >= 1"),
    (["--platform", "gpu", "--num-slices", "2"], "--num-slices is for --platform tpu"),
    (["--dcn-mesh", "data"], "expected NAME=SIZE"),
    *[([f"--{name}", "0"], f"--{name} must be >= 1")
      for name in ("grad-accum", "prompts", "text-len", "mask-size", "eval-text-len", "eval-size")],
])
def test_bad_flags(argv, message, capsys):
  with pytest.raises(SystemExit) as e:
    train_compile.main(argv)
  err = capsys.readouterr().err.strip().splitlines()
  assert e.value.code == 2 and len(err) == 1 and message in err[0]


def test_does_not_overwrite(tmp_path, capsys):
  for flag in ("--json", "--dump-hlo"):
    mine = tmp_path / "summary.json"
    mine.write_text("keep")
    with pytest.raises(SystemExit) as e:
      train_compile.main([flag, str(mine)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and mine.read_text() == "keep" and len(err) == 1 and "not overwriting" in err[0]


def test_model_preset_of_the_other_family_takes_its_trainable_set():
  """`--model-preset`: EVF-SAM's trainable patterns name parameters EVF-SAM2 lacks (sam/mask_decoder/...), so a
  preset of the other family brings its own default set; within a family the config's set stays."""
  pytest.importorskip("jax")
  from evf_jax.train import config as train_config
  cfg = train_compile.load_config("configs/train/refcoco.py")
  train_compile.use_preset(cfg, "toy")
  assert "sam2" in cfg.model and tuple(cfg.trainable) == train_config.EVF_SAM2_TRAINABLE
  train_compile.use_preset(cfg, "tiny")
  assert "sam" in cfg.model and tuple(cfg.trainable) == train_config.EVF_SAM_TRAINABLE
  cfg = train_compile.load_config("configs/train/synthetic.py:sam2")
  train_compile.use_preset(cfg, "evf-sam2")
  assert tuple(cfg.trainable) == train_config.EVF_SAM2_IMAGE_PATH


# ------------------------------------------------------------------ main() here, XLA's compile stood in for


class _Compiled:
  """What main() reads of a compiled program, with numbers these tests know: memory analysis, text and FLOPs."""

  def __init__(self, memory: dict, hlo: str):
    self.memory, self.hlo = memory, hlo

  def memory_analysis(self):
    return types.SimpleNamespace(**{f"{name}_size_in_bytes": size for name, size in self.memory.items()})

  def as_text(self):
    return self.hlo

  def cost_analysis(self):
    return {"flops": 1.5e9}


# An all-gather whose groups are not written: all the devices of the (one slice's) program.
UNGROUPED_HLO = """ENTRY %main (a: f32[256]) -> f32[1024] {
  %a = f32[256]{0} parameter(0)
  ROOT %ag = f32[1024]{0} all-gather(f32[256]{0} %a), channel_id=1, dimensions={0}
}"""
TRAIN_MEMORY = {"output": 300_000, "alias": 200_000, "temp": 50_000, "generated_code": 7_000}
EVAL_MEMORY = {"argument": 11, "output": 130_000, "temp": 17_000, "generated_code": 900}
EVAL_BATCH_SIZE = 5  # the config's eval.batch_size, for these runs


@contextlib.contextmanager
def _stand_ins(programs: list, devices: int):
  """main() on this machine's CPU devices, each compile answered by the next of `programs`: the steps are traced and
  lowered as for the chips (that is the trainer's code), and what the tool makes of the compiled programs is
  checked against known numbers (compiling even the tiny step takes a minute on 2 cores). Yields what it saw: the
  lowered steps, the device requests and the evaluation's arguments."""
  import jax

  from evf_jax import flops
  from evf_jax.sam import rel_pos_attention
  seen = {"lowered": [], "devices": [], "eval": []}
  load_config, compile_eval = train_compile.load_config, train_compile._compile_eval

  def compile_(lowered, *args, **kwargs):
    seen["lowered"].append(lowered)
    return programs[len(seen["lowered"]) - 1]

  def devices_(*args):
    seen["devices"].append(args)
    return jax.devices()[:devices]

  def load(spec):
    cfg = load_config(spec)
    cfg.eval.batch_size = EVAL_BATCH_SIZE
    return cfg

  def evaluation(*args):
    seen["eval"].append(args)
    return compile_eval(*args)

  if jax.device_count() < devices:
    pytest.skip(f"needs {devices} devices")
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(jax.stages.Lowered, "compile", compile_)
    mp.setattr(deviceless, "use_compile_only_tpu", lambda tool: None)
    mp.setattr(deviceless, "use_compile_only_cuda", lambda flags, tool: None)
    mp.setattr(deviceless, "tpu_devices", devices_)
    mp.setattr(deviceless, "cuda_devices", devices_)
    mp.setattr(rel_pos_attention, "default_chunking", rel_pos_attention.default_chunking)  # main() rebinds it on TPU
    mp.setattr(flops, "peak_flops", lambda kind: 2e14)
    mp.setattr(train_compile, "load_config", load)
    mp.setattr(train_compile, "_compile_eval", evaluation)
    yield seen


EVAL_FLAGS = ("--eval", "--eval-prompts", "2", "--eval-text-len", "8", "--eval-size", "128")


@pytest.fixture(scope="module")
def gpu_run(tmp_path_factory):
  """The tiny model's step for 4 H100s (4 CPU devices here), data=2 x fsdp=2, 8 images in 2 microbatches, 2 prompts
  of 16 tokens, masks at 48, frozen parameters replicated, with its evaluation step; the training program's memory
  adds up to exactly the H100's HBM. Then that evaluation again with the HBM at exactly its peak."""
  hbm = train_compile.GPU_HBM["h100"]
  train = dict(TRAIN_MEMORY, argument=hbm - (300_000 - 200_000 + 50_000 + 7_000))
  path = tmp_path_factory.mktemp("gpu_run") / "summary.json"
  programs = [_Compiled(train, UNGROUPED_HLO)] + [_Compiled(EVAL_MEMORY, UNGROUPED_HLO)] * 2
  with _stand_ins(programs, devices=4) as seen:
    rc = train_compile.main(["--platform", "gpu", "--model-preset", "tiny", "--mesh", "data=2,fsdp=2,tensor=1",
                             "--batch-size", "8", "--grad-accum", "2", "--prompts", "2", "--text-len", "16",
                             "--mask-size", "48", "--replicate-frozen", *EVAL_FLAGS, "--json", str(path)])
    summary = json.loads(path.read_text())
    *args, state = seen["eval"][0]
    peak = summary["evaluation"]["peak_per_device_bytes"]
    at_peak = train_compile._compile_eval(*args, dict(state, hbm_bytes=peak))
  return types.SimpleNamespace(rc=rc, summary=summary, seen=seen, hbm=hbm, train=train, at_peak=at_peak,
                               model_config=args[2])


def test_gpu_run_summary(gpu_run):
  """The flags reach the config; memory per device is arguments + outputs not aliased to the donated state +
  temporaries + code, and "fits" allows exactly the chip's HBM (the H100's, as the target says); FLOPs per device
  and at the peak; the ungrouped gather counted over the 4 devices."""
  from evf_jax import flops
  summary = gpu_run.summary
  assert gpu_run.rc == 0 and gpu_run.seen["devices"] == [("h100", "1x1x4")]
  st = summary["settings"]
  assert (st["platform"], st["topology"], st["target"], st["num_slices"]) == ("gpu", "1x1x4", "h100", 1)
  assert st["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1} and st["dcn_mesh"] == {"data": 1, "fsdp": 1, "tensor": 1}
  sizes = (st["batch_size"], st["grad_accum"], st["prompts_per_image"], st["text_len"], st["mask_size"])
  assert sizes == (8, 2, 2, 16, 48)
  assert st["replicate_frozen"] is True and summary["devices"] == 4
  mem = summary["memory_per_device_bytes"]
  assert mem == dict(gpu_run.train, total=gpu_run.hbm) and summary["hbm_bytes"] == gpu_run.hbm
  assert summary["fits"] is True
  model_flops = flops.train_step(gpu_run.model_config, images=8, prompts_per_image=2, text_len=16,
                                 encoder_frozen=st["encoder_frozen"], decoder_trained=st["decoder_trained"])
  assert summary["model_flops_per_step"] == model_flops > 0
  assert summary["model_flops_per_device"] == model_flops / 4 and summary["step_s_at_peak"] == model_flops / 4 / 2e14
  assert summary["xla_flops_per_device"] == 1.5e9
  assert summary["collectives"] == {"all-gather": {"ops": 1, "per_step": 1, "result_bytes": 4096,
                                                   "link_bytes": 4096 * 3 // 4}}


def test_gpu_run_lowers_the_step_as_the_trainer_jits_it(gpu_run):
  """The training state donated (its outputs alias it), the batch not; the batch in the data pipeline's layout
  (evf_testing's random_batch builds it as the pipeline does), each device holding a quarter of it."""
  import jax

  from evf_testing.training import random_batch
  state, batch = gpu_run.seen["lowered"][0].args_info[0]
  assert all(a.donated for a in jax.tree.leaves(state)) and not any(a.donated for a in batch.values())
  expected = random_batch(gpu_run.model_config, images=8, prompts=2, text_len=16, mask_size=48)
  assert {k: (a.shape, a.dtype) for k, a in batch.items()} == {k: (v.shape, v.dtype) for k, v in expected.items()}
  assert gpu_run.summary["batch_per_device_bytes"] * 4 == sum(v.nbytes for v in expected.values())


def test_gpu_run_evaluation_beside_the_training_state(gpu_run):
  """eval.batch_size (5) rounded up to the devices (8 images); the peak is the whole training state plus the
  step's batch, outputs, temporaries and code, and fits at exactly the HBM."""
  summary = gpu_run.summary
  ev = summary["evaluation"]
  assert ev["images"] == 8 and gpu_run.seen["lowered"][1].args_info[0][1]["sam_image"].shape[0] == 8
  assert ev["memory_per_device_bytes"] == EVAL_MEMORY
  state = sum(summary["state_per_device_bytes"].values())
  assert ev["peak_per_device_bytes"] == state + ev["batch_per_device_bytes"] + 130_000 + 17_000 + 900
  assert ev["fits"] is True and gpu_run.at_peak["fits"] is True
  assert ev["collectives"] == summary["collectives"]


@pytest.fixture(scope="module")
def two_slices_run(tmp_path_factory):
  """Two v5e 2x2 slices (8 CPU devices here, laid out as one), data=2 spanning them, fsdp=4 inside each."""
  path = tmp_path_factory.mktemp("two_slices") / "summary.json"
  with _stand_ins([_Compiled(dict(TRAIN_MEMORY, argument=1), UNGROUPED_HLO),
                   _Compiled(EVAL_MEMORY, UNGROUPED_HLO)], devices=8) as seen:
    rc = train_compile.main(["--model-preset", "tiny", "--num-slices", "2", "--mesh", "data=2,fsdp=4,tensor=1",
                             "--batch-size", "8", *EVAL_FLAGS, "--json", str(path)])
  return rc, json.loads(path.read_text()), seen


def test_two_slices_count_inside_a_slice(two_slices_run):
  """The slices are asked of libtpu; a program's collectives stay inside its slice, so one without written groups
  spans a slice's 4 devices, not all 8, in training and in evaluation; no HBM known for the CPU: no verdict."""
  rc, summary, seen = two_slices_run
  assert rc == 0 and seen["devices"] == [("v5e:2x2", 2)]
  st = summary["settings"]
  assert (st["topology"], st["target"], st["num_slices"]) == ("v5e:2x2", None, 2)
  assert st["dcn_mesh"] == {"data": 2, "fsdp": 1, "tensor": 1} and summary["devices"] == 8
  assert summary["hbm_bytes"] is None and summary["fits"] is None and summary["evaluation"]["fits"] is None
  for part in (summary, summary["evaluation"]):
    assert part["collectives"]["all-gather"]["link_bytes"] == 4096 * 3 // 4
    assert [c["group"] for c in part["largest_collectives"]] == [4]


@pytest.mark.parametrize("argv,message", [
    (["--grad-accum", "4"], "microbatches of 2 images, which the 4 batch shards"),
    (["--batch-size", "6"], "microbatches of 6 images, which the 4 batch shards"),
    (["--mesh", "data=3"], "has 3 devices, but there are 4"),
])
def test_one_line_errors_before_compiling(argv, message, capsys):
  """The batch must split into microbatches over the batch shards (data x fsdp), the mesh must cover the devices."""
  with _stand_ins([], devices=4) as seen:
    rc = train_compile.main(["--platform", "gpu", "--model-preset", "tiny", "--mesh", "data=2,fsdp=2,tensor=1",
                             "--batch-size", "8", *argv])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and len(err) == 1 and message in err[0] and not seen["lowered"], err


def test_unknown_topology_in_one_line(capsys):
  def unknown(*args):
    raise RuntimeError("no topology 9x9x9\n  (the plugin's trace)")

  with _stand_ins([], devices=4):
    deviceless.cuda_devices = unknown  # undone with the stand-ins
    rc = train_compile.main(["--platform", "gpu", "--topology", "9x9x9", "--model-preset", "tiny"])
  err = capsys.readouterr().err.strip().splitlines()
  assert rc == 2 and err == ["error: gpu topology '9x9x9': no topology 9x9x9"]


def _compile(python: pathlib.Path, tmp_path, *argv) -> tuple[dict, str]:
  """(the summary, the compiled HLO)."""
  out, hlo = tmp_path / "summary.json", tmp_path / "step.hlo"
  # Without the test session's jax settings (fast-compile mode, a persistent cache, 8 simulated CPU devices).
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
  proc = subprocess.run([str(python), "-m", "benchmarks.train_compile", *argv, "--json", str(out), "--dump-hlo",
                         str(hlo)], cwd=ROOT, capture_output=True, text=True, timeout=1200, env=env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(out.read_text()), hlo.read_text()


TPU_PYTHON = ROOT / ".venv-tpu-static" / "bin" / "python"
GPU_PYTHON = ROOT / ".venv-gpu-static" / "bin" / "python"


def _check(summary: dict, devices: int, kind: str) -> None:
  assert summary["devices"] == devices and kind in summary["device_kind"]
  mem = summary["memory_per_device_bytes"]
  assert mem["argument"] >= sum(summary["state_per_device_bytes"].values()) > 0
  assert summary["fits"] is True and 0 < mem["total"] < summary["hbm_bytes"]
  # Gradients are summed over the data-parallel devices; FSDP gathers the weights and scatters the gradients.
  traffic = summary["collectives"]
  assert traffic["all-reduce"]["per_step"] >= 1 and traffic["all-reduce"]["result_bytes"] > 0
  assert "all-gather" in traffic and traffic["all-gather"]["link_bytes"] > 0
  assert summary["model_flops_per_step"] > 0


def _check_text_embedding(hlo: str, devices: int) -> None:
  """With fsdp=2 and data=2, BEiT-3's text table (the tiny model's: 64010 x 32) is never gathered whole, nor its
  whole gradient reduced: each device's width half of the gradient is summed over its 2 data groups (the GPU
  compiler flattens it into one buffer with other gradients, hence sizes rather than shapes)."""
  def arrays(shape: str) -> list[int]:
    return [math.prod(int(d) for d in dims.split(",") if d) for dims in re.findall(r"\[([\d,]*)\]", shape)]

  whole, half = 64010 * 32, 64010 * 16
  every = train_compile.largest_collectives(hlo, devices, n=100_000)
  assert not [c for c in every if max(arrays(c["shape"]), default=0) >= whole], every
  assert [c["group"] for c in every if c["op"] == "all-reduce" and max(arrays(c["shape"]), default=0) >= half] == [2]


def _check_evaluation(summary: dict, devices: int) -> None:
  """The evaluation step inside training (`--eval`) fits beside the training state, gathers the FSDP-split weights,
  and moves no image between the data groups: the weights are split over fsdp=2, so a collective over all the
  devices would be examples moving (as when a plain vmap put the batch split on each image's prompts)."""
  ev = summary["evaluation"]
  assert ev["fits"] is True and ev["peak_per_device_bytes"] > sum(summary["state_per_device_bytes"].values())
  assert ev["images"] % devices == 0 and ev["collectives"]["all-gather"]["result_bytes"] > 0
  assert ev["largest_collectives"] and not [c for c in ev["largest_collectives"] if c["group"] >= devices], ev


@pytest.mark.slow
@pytest.mark.skipif(not TPU_PYTHON.exists(), reason="needs scripts/setup_static_env.sh tpu (~1.5 GB)")
def test_train_step_for_a_tpu_slice(tmp_path):
  """The tiny model's training step, data x FSDP over the 4 chips of a v5e 2x2 slice, as `Trainer.run` jits it, and
  its evaluation step."""
  summary, hlo = _compile(TPU_PYTHON, tmp_path, "--topology", "v5e:2x2", "--model-preset", "tiny", "--batch-size",
                          "8", "--mesh", "data=2,fsdp=2,tensor=1", "--eval")
  _check(summary, 4, "TPU v5 lite")
  _check_text_embedding(hlo, 4)
  _check_evaluation(summary, 4)
  assert summary["settings"]["mesh"] == {"data": 2, "fsdp": 2, "tensor": 1}


@pytest.mark.slow
@pytest.mark.skipif(not TPU_PYTHON.exists(), reason="needs scripts/setup_static_env.sh tpu (~1.5 GB)")
def test_evf_sam2_train_step_for_a_tpu_slice(tmp_path):
  """The toy EVF-SAM2 in place of the released config's model: SAM-2's 128 px square frame, the original's frozen
  set (BEiT-3 and the projector trained, all of SAM-2 frozen, so its decoder is differentiated but not trained),
  the model FLOPs counted that way, and the evaluation step with SAM-2's low-res size."""
  from evf_jax import flops
  from evf_jax.evf_sam2 import EvfSam2Config
  summary, hlo = _compile(TPU_PYTHON, tmp_path, "--topology", "v5e:2x2", "--model-preset", "toy", "--batch-size",
                          "8", "--mesh", "data=2,fsdp=2,tensor=1", "--eval")
  _check(summary, 4, "TPU v5 lite")
  _check_text_embedding(hlo, 4)  # the toy's BEiT-3 is the tiny one
  _check_evaluation(summary, 4)
  st = summary["settings"]
  assert summary["family"] == "EVF-SAM2" and st["sam_img_size"] == st["mask_size"] == 128
  assert st["encoder_frozen"] is True and st["decoder_trained"] is False
  config = EvfSam2Config.preset("toy")
  assert summary["model_flops_per_step"] == flops.train_step(config, images=8, prompts_per_image=3, text_len=64,
                                                             encoder_frozen=True, decoder_trained=False)


@pytest.mark.slow
@pytest.mark.skipif(not TPU_PYTHON.exists(), reason="needs scripts/setup_static_env.sh tpu (~1.5 GB)")
def test_train_step_for_two_tpu_slices(tmp_path):
  """Two v5e 2x2 slices (8 chips) with the default dcn_mesh: data spans the slices, FSDP stays inside each. Every
  collective of the slice's program is among its 4 chips, and what goes to the other slice is the data-parallel
  gradient reduction: about this chip's FSDP quarter of the trained parameters' gradient, in float32. The
  evaluation step sends nothing to the other slice."""
  summary, _ = _compile(TPU_PYTHON, tmp_path, "--topology", "v5e:2x2", "--num-slices", "2", "--model-preset",
                        "tiny", "--batch-size", "8", "--mesh", "data=2,fsdp=4,tensor=1", "--eval")
  assert summary["devices"] == 8 and summary["fits"] is True
  assert summary["settings"]["dcn_mesh"] == {"data": 2, "fsdp": 1, "tensor": 1}
  inside = [c for c in summary["largest_collectives"] if c["op"] != train_compile.DCN_SEND]
  assert inside and max(c["group"] for c in inside) == 4, inside
  grad_shard = summary["parameters"]["trained"] * 4 / 4
  sent = summary["collectives"][train_compile.DCN_SEND]["result_bytes"]
  assert 0.8 * grad_shard < sent < 1.5 * grad_shard, (sent, grad_shard)
  # The evaluation inside training splits the images over the slices: nothing of it crosses the DCN.
  ev = summary["evaluation"]
  assert ev["fits"] is True and train_compile.DCN_SEND not in ev["collectives"], ev["collectives"]
  assert max(c["group"] for c in ev["largest_collectives"]) == 4


@pytest.mark.slow
@pytest.mark.skipif(not GPU_PYTHON.exists(), reason="needs scripts/setup_static_env.sh gpu (~6 GB)")
def test_train_step_for_four_gpus(tmp_path):
  summary, hlo = _compile(GPU_PYTHON, tmp_path, "--platform", "gpu", "--topology", "1x1x4", "--model-preset", "tiny",
                          "--batch-size", "8", "--mesh", "data=2,fsdp=2,tensor=1", "--eval")
  _check(summary, 4, "H100")
  _check_text_embedding(hlo, 4)
  _check_evaluation(summary, 4)
