"""Training-step speed and memory on this CPU: evf-jax's train step against a PyTorch training step of the same
model (the PyPI reference modules: segment-anything + torchscale + EVF-SAM's glue), same weights, same batch,
same frozen set, same optimizer, fp32 on both sides.

    python -m benchmarks.train_cpu [--size base] [--steps 3] [--rounds 2] [--parts] [--out r.json]
    python -m benchmarks.train_cpu --quick          # tiny model, seconds (tests)

Set-up (both sides):
  weights  random torch weights (seeded), converted with OUR converter (`convert.evf.convert_evf`); the
           PyTorch side rebuilds the same seeded module;
  batch    `evf_testing.training.random_batch`: --images images x --prompts prompts (all valid), prompts padded
           to --text-len tokens, the loss at --mask-size (default 1024: SAM's input size, the training
           config's default `data.mask_size = 0`); the batch is in memory before timing (data-free: the
           input pipeline is measured by benchmarks/data_throughput.py);
  trained  BEiT-3, the projector, SAM's mask decoder and `no_mask_embed` (EVF_SAM_TRAINABLE /
           TORCH_TRAINABLE); SAM's image encoder is frozen and runs forward only (stop_gradient / no_grad);
  step     ours: `make_train_step` jitted as the trainer jits it (one-device mesh, state shardings, donated
           state); PyTorch: `evf_testing.training.torch_training_loss` (EVF-SAM's training forward: per image,
           BEiT-3 on its prompts, the decoder, bilinear upsampling, the same loss), backward,
           clip_grad_norm_(1.0), torch.optim.AdamW;
  AdamW    betas (0.9, 0.95), eps 1e-8, constant lr, --weight-decay on weight matrices / conv kernels only
           (ours: `optimizer.decay_mask`; PyTorch: two parameter groups, the weights of Linear / Conv2d /
           ConvTranspose2d decayed); the decayed and trained element counts of both sides are checked equal.

Each side runs in its own child process (peak memory is its own), ours and PyTorch alternating --rounds times.
Per run: ours compiles (trace + lower, then XLA compile, reported apart), then --warmup steps, then --steps
timed steps (each waited for); the step time is the median over all timed steps of all rounds. Memory: peak
RSS of the whole process, and the peak during compile + steps (VmHWM reset after loading the weights). The
per-step losses of both sides are reported: the same weights and batch give the same first loss, and the same
optimizer keeps them together.

--parts also times each part of the step alone on both sides (encoder forward, BEiT-3 + projector
forward + backward, decoder forward + backward, upsampling + loss forward + backward, clipping + AdamW), to see
where a difference comes from.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

from evf_testing import benchmarking as common

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BETAS = (0.9, 0.95)
EPS = 1e-8
CLIP = 1.0


# ---------------------------------------------------------------- shared


def model_config(size: str):
  from evf_jax.evf import EvfConfig
  return EvfConfig.preset(size)


def make_batch(config, args) -> dict:
  from evf_testing.training import random_batch
  return random_batch(config, images=args.images, prompts=args.prompts, text_len=args.text_len,
                      mask_size=args.mask_size, seed=args.seed, invalid=0)


def weights_path(args) -> str:
  return os.path.join(args.workdir, f"train_{args.size}_seed{args.seed}.npz")


def reset_peak_rss() -> bool:
  """Resets this process's VmHWM to its current RSS (Linux); False where that is not allowed."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def vm_hwm_mib() -> float | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1]) / 1024.0
  except OSError:
    pass
  return None


def cpu_seconds() -> float:
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_utime + r.ru_stime


def time_steps(step, n: int, cpu: list | None = None) -> list[float]:
  """Wall seconds of each of n calls; with `cpu`, this process's CPU seconds (all threads) of each call appended
  to it: on a machine shared with other work, wall time also counts the time other processes held the cores."""
  times = []
  for _ in range(n):
    c0, t0 = cpu_seconds(), time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
    if cpu is not None:
      cpu.append(cpu_seconds() - c0)
  return times


# ---------------------------------------------------------------- prepare (parent)


def run_prepare(args) -> dict:
  """The seeded torch model through our converter -> an .npz of the converted parameter tree."""
  from flax import traverse_util
  from convert.evf import convert_evf
  from evf_testing import evf_reference as ref
  from evf_testing import torch_reference as tr
  config = model_config(args.size)
  path = weights_path(args)
  if not os.path.isfile(path):
    t0 = time.perf_counter()
    model = ref.build_torch_evf(config, args.seed)
    params = convert_evf(tr.state_dict_numpy(model), config).params
    flat = traverse_util.flatten_dict(params, sep="/")
    tmp = path + ".tmp.npz"
    np.savez(tmp, **{k: np.asarray(v) for k, v in flat.items()})
    os.replace(tmp, path)
    return dict(path=path, seconds=time.perf_counter() - t0)
  return dict(path=path, seconds=0.0)


# ---------------------------------------------------------------- ours (child)


def _load_params(args):
  from flax import traverse_util
  with np.load(weights_path(args)) as z:
    flat = {k: z[k] for k in z.files}
  return traverse_util.unflatten_dict(flat, sep="/")


def _ours_setup(args):
  import jax
  import jax.numpy as jnp
  import optax
  from jax.sharding import NamedSharding, PartitionSpec as P
  from evf_jax import sharding
  from evf_jax.evf import EvfSam
  from evf_jax.train import config as train_config
  from evf_jax.train import optimizer, partition
  from evf_jax.train.step import StepOptions, make_train_step
  from evf_jax.train.trainer import fresh_state, state_layout
  config = model_config(args.size)
  trainable = train_config.EVF_SAM_TRAINABLE
  schedule = optimizer.learning_rate(args.lr, total_steps=1_000_000, warmup_steps=0, schedule="constant")
  tx = optimizer.adamw(schedule, b1=BETAS[0], b2=BETAS[1], eps=EPS, weight_decay=args.weight_decay,
                       clip_norm=CLIP)
  mesh = sharding.make_mesh([("data", 1)], jax.devices()[:1])
  rules = sharding.rules_for(mesh, sharding.DEFAULT_RULES)
  shapes, shards, _ = state_layout(config, trainable, tx, mesh, rules)
  params = _load_params(args)
  state = fresh_state(params, trainable, tx, shards)
  del params
  gc.collect()
  options = StepOptions(dtype=jnp.float32, encoder_frozen=partition.encoder_frozen(shapes["params"]))
  model = EvfSam(config)
  fn = make_train_step(model, config, tx, schedule, options)
  batch_sh = sharding.batch_sharding(mesh, rules)
  with sharding.activate(mesh, rules):
    step = jax.jit(fn, in_shardings=(shards, batch_sh), out_shardings=(shards, NamedSharding(mesh, P())),
                   donate_argnums=0)
  decay = optimizer.decay_mask(shapes["params"])
  counts = dict(
      trained=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"])),
      frozen=sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["frozen"])),
      decayed=sum(int(np.prod(x.shape)) for x, d in zip(jax.tree.leaves(shapes["params"]), jax.tree.leaves(decay))
                  if d))
  return dict(config=config, model=model, tx=tx, mesh=mesh, rules=rules, state=state, step=step,
              batch_sh=batch_sh, options=options, counts=counts, optax=optax)


def run_ours(args) -> dict:
  import jax
  from evf_jax import sharding
  s = _ours_setup(args)
  config, mesh, rules = s["config"], s["mesh"], s["rules"]
  host_batch = make_batch(config, args)
  hwm_reset = reset_peak_rss()
  with sharding.activate(mesh, rules):
    batch = sharding.global_batch(host_batch, s["batch_sh"])
    state = s["state"]
    t0 = time.perf_counter()
    lowered = s["step"].lower(state, batch)
    trace_lower = time.perf_counter() - t0
    t0 = time.perf_counter()
    compiled = lowered.compile()
    compile_s = time.perf_counter() - t0
    losses = []

    def one():
      nonlocal state
      state, metrics = compiled(state, batch)
      jax.block_until_ready((state, metrics))
      losses.append(float(metrics["loss"]))

    warm = time_steps(one, args.warmup)
    cpu = []
    times = time_steps(one, args.steps, cpu)
  return dict(step_s=statistics.median(times), step_all=times, cpu_all=cpu, warmup_all=warm, trace_lower_s=trace_lower,
              compile_s=compile_s, losses=losses, counts=s["counts"], peak_rss_mib=common.peak_rss_mib(),
              train_peak_rss_mib=vm_hwm_mib() if hwm_reset else None, jax=jax.__version__,
              backend=jax.default_backend())


def run_ours_parts(args) -> dict:
  """Each part of our step alone (jitted, waited for; median of --part-repeats after one warm-up call)."""
  import jax
  import jax.numpy as jnp
  from evf_jax import sharding
  from evf_jax.evf import EvfSam
  from evf_jax.sam.transforms import normalize_and_pad
  from evf_jax.train import losses, partition
  from evf_jax.train.step import upsample_matrix
  s = _ours_setup(args)
  config, model, mesh, rules = s["config"], s["model"], s["mesh"], s["rules"]
  hb = make_batch(config, args)
  b, k, length = hb["input_ids"].shape
  m = hb["masks"].shape[-1]
  rng = np.random.default_rng(1)
  trained, frozen = s["state"]["params"], s["state"]["frozen"]

  text_p, dec_p = partition.split(trained, ["beit3/.*", "projector/.*"])  # BEiT-3 + projector; the rest

  def full(tp, dp, fr):
    return {"params": partition.merge(partition.merge(tp, dp), fr)}

  # Every parameter is an argument (closed-over arrays could become constants of the program).
  @jax.jit
  def encoder(fr, images, hw):
    x = normalize_and_pad(images, hw, config.sam.img_size, config.sam.pixel_mean, config.sam.pixel_std)
    return model.apply({"params": fr}, x, method=EvfSam.embed_image)

  def text_loss(tp, dp, fr, beit, ids, mask, ct):
    prompts = model.apply(full(tp, dp, fr), beit, ids, mask, method=EvfSam.text_prompts)
    return jnp.sum(prompts * ct)
  text_grad = jax.jit(jax.value_and_grad(text_loss))

  def dec_loss(dp, prompts, tp, fr, emb, ct):
    low, _ = model.apply(full(tp, dp, fr), jnp.repeat(emb, k, axis=0), prompts, method=EvfSam.decode)
    return jnp.sum(low * ct)
  dec_grad = jax.jit(jax.value_and_grad(dec_loss, argnums=(0, 1)))

  def head_loss(low, masks, region, valid):
    a = jnp.asarray(upsample_matrix(low.shape[-1], m))
    logits = jnp.einsum("hk,nkl,wl->nhw", a, low[:, 0], a, precision="highest")
    return losses.mask_loss(logits, masks.reshape(b * k, m, m), jnp.repeat(region, k, axis=0),
                            valid.reshape(b * k))[0]
  head_grad = jax.jit(jax.value_and_grad(head_loss))

  tx = s["tx"]
  opt_state = s["state"]["opt_state"]
  grads = jax.tree.map(lambda x: jnp.asarray(rng.normal(0, 1e-3, x.shape), x.dtype), trained)

  @jax.jit
  def opt(params, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, params)
    return s["optax"].apply_updates(params, updates), opt_state

  with sharding.activate(mesh, rules):
    emb = encoder(frozen, hb["sam_image"], hb["resize_hw"])
    beit = jnp.repeat(jnp.asarray(hb["beit_image"]), k, axis=0)
    ids = jnp.asarray(hb["input_ids"].reshape(b * k, length))
    mask = jnp.asarray(hb["attention_mask"].reshape(b * k, length))
    prompts = model.apply(full(text_p, dec_p, frozen), beit, ids, mask, method=EvfSam.text_prompts)
    low, _ = model.apply(full(text_p, dec_p, frozen), jnp.repeat(emb, k, axis=0), prompts, method=EvfSam.decode)
    ct_prompt = jnp.asarray(rng.normal(size=prompts.shape), jnp.float32)
    ct_low = jnp.asarray(rng.normal(size=low.shape), jnp.float32)
    calls = {
        "encoder_fwd": lambda: encoder(frozen, hb["sam_image"], hb["resize_hw"]),
        "beit3_fwd_bwd": lambda: text_grad(text_p, dec_p, frozen, beit, ids, mask, ct_prompt),
        "decoder_fwd_bwd": lambda: dec_grad(dec_p, prompts, text_p, frozen, emb, ct_low),
        "upsample_loss_fwd_bwd": lambda: head_grad(low, hb["masks"], hb["valid_region"], hb["prompt_valid"]),
        "clip_adamw": lambda: opt(trained, opt_state, grads),
    }
    out = {}
    for name, fn in calls.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())  # compiles
      first = time.perf_counter() - t0
      t, _ = common.timed(lambda fn=fn: jax.block_until_ready(fn()), args.part_repeats)
      out[name] = t
      out[name + "_first_call"] = first
  return out


# ---------------------------------------------------------------- PyTorch (child)


def _torch_normalize_and_pad(images, input_hw, img_size, mean, std):
  """`evf_jax.sam.transforms.normalize_and_pad` in torch, in place of `evf_testing.training.sam_input` (jax: the
  PyTorch side should not dispatch jax ops inside its timed step)."""
  import torch
  x = (torch.from_numpy(np.asarray(images)).float() - torch.tensor(mean)) / torch.tensor(std)
  hw = torch.from_numpy(np.asarray(input_hw))
  ar = torch.arange(img_size)
  valid = (ar[None, :, None] < hw[:, 0, None, None]) & (ar[None, None, :] < hw[:, 1, None, None])
  return torch.where(valid[..., None], x, 0.0).numpy()


def _torch_setup(args):
  import torch
  torch.set_num_threads(args.threads)
  from evf_testing import evf_reference as ref
  from evf_testing import training
  config = model_config(args.size)
  training.sam_input = lambda config, batch: _torch_normalize_and_pad(
      batch["sam_image"], batch["resize_hw"], config.sam.img_size, config.sam.pixel_mean, config.sam.pixel_std)
  model = ref.build_torch_evf(config, args.seed)
  decay_types = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.ConvTranspose2d)
  decayed_names = {f"{mod_name}.weight" if mod_name else "weight" for mod_name, mod in model.named_modules()
                   if isinstance(mod, decay_types)}
  trainable = [(n, p) for n, p in model.named_parameters() if n.startswith(training.TORCH_TRAINABLE)]
  decay = [p for n, p in trainable if n in decayed_names and p.ndim >= 2]
  no_decay = [p for n, p in trainable if not (n in decayed_names and p.ndim >= 2)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=BETAS, eps=EPS)
  counts = dict(trained=sum(p.numel() for _, p in trainable),
                frozen=sum(t.numel() for t in model.state_dict().values()) - sum(p.numel() for _, p in trainable),
                decayed=sum(p.numel() for p in decay))
  return torch, training, config, model, [p for _, p in trainable], opt, counts


def run_torch(args) -> dict:
  torch, training, config, model, params, opt, counts = _torch_setup(args)
  batch = make_batch(config, args)
  hwm_reset = reset_peak_rss()
  losses = []

  def one():
    opt.zero_grad(set_to_none=True)
    loss = training.torch_training_loss(model, config, batch)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    opt.step()
    losses.append(float(loss.detach()))

  warm = time_steps(one, args.warmup)
  cpu = []
  times = time_steps(one, args.steps, cpu)
  return dict(step_s=statistics.median(times), step_all=times, cpu_all=cpu, warmup_all=warm, losses=losses,
              counts=counts,
              peak_rss_mib=common.peak_rss_mib(), train_peak_rss_mib=vm_hwm_mib() if hwm_reset else None,
              torch=torch.__version__, threads=torch.get_num_threads())


def run_torch_parts(args) -> dict:
  """The reference's parts alone, as torch_training_loss runs them (per image: BEiT-3 on its prompts, the
  decoder; per mask: the loss); backward with random cotangents where a part's output is not the loss."""
  torch, training, config, model, params, opt, _ = _torch_setup(args)
  F = torch.nn.functional
  hb = make_batch(config, args)
  b, k, length = hb["input_ids"].shape
  m = hb["masks"].shape[-1]
  sam = model.visual_model
  for name, p in model.named_parameters():
    p.requires_grad_(name.startswith(training.TORCH_TRAINABLE))
  g = torch.Generator().manual_seed(1)

  def encoder():
    x = _torch_normalize_and_pad(hb["sam_image"], hb["resize_hw"], config.sam.img_size, config.sam.pixel_mean,
                                 config.sam.pixel_std)
    with torch.no_grad():
      return sam.image_encoder(torch.from_numpy(x).permute(0, 3, 1, 2))
  emb = encoder()
  ids = [torch.from_numpy(hb["input_ids"][i].astype(np.int64)) for i in range(b)]
  beit = [torch.from_numpy(hb["beit_image"][i]).permute(2, 0, 1)[None].expand(k, -1, -1, -1) for i in range(b)]
  ct_prompt = torch.randn((k, 1, config.out_dim), generator=g)

  def text(i):
    out = model.mm_extractor.beit3(visual_tokens=beit[i], textual_tokens=ids[i], text_padding_position=ids[i] == 1)
    return model.text_hidden_fcs[0](out["encoder_out"][:, :1])

  def text_fwd_bwd():
    for i in range(b):
      (text(i) * ct_prompt).sum().backward()

  pe = sam.prompt_encoder
  e = pe.image_embedding_size
  feats = [text(i).detach() for i in range(b)]

  def decode(i, feat):
    dense = pe.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(k, -1, e[0], e[1])
    low, _ = sam.mask_decoder(image_embeddings=emb[i:i + 1], image_pe=pe.get_dense_pe(),
                              sparse_prompt_embeddings=feat, dense_prompt_embeddings=dense, multimask_output=False)
    return low
  low0 = decode(0, feats[0]).detach()
  ct_low = torch.randn(low0.shape, generator=g)

  def dec_fwd_bwd():
    for i in range(b):
      feat = feats[i].clone().requires_grad_(True)
      (decode(i, feat) * ct_low).sum().backward()

  lows = [decode(i, feats[i]).detach() for i in range(b)]

  def head_fwd_bwd():
    bces, dices = [], []
    for i in range(b):
      low = lows[i].clone().requires_grad_(True)
      logits = F.interpolate(low, (m, m), mode="bilinear", align_corners=False)[:, 0]
      region = torch.from_numpy(hb["valid_region"][i])
      target = torch.from_numpy(hb["masks"][i].astype(np.float32))
      for j in range(k):
        xj, tj = logits[j][region], target[j][region]
        bces.append(F.binary_cross_entropy_with_logits(xj, tj))
        pj = xj.sigmoid()
        dices.append(1 - (2 * (pj / 1000 * tj).sum() + 1e-6) / ((pj / 1000).sum() + (tj / 1000).sum() + 1e-6))
    n = len(bces) + 1e-8
    (2.0 * torch.stack(bces).sum() / n + 0.5 * torch.stack(dices).sum() / n).backward()

  grads = [torch.randn(p.shape, generator=g) * 1e-3 for p in params]

  def clip_adamw():
    for p, gr in zip(params, grads):
      p.grad = gr.clone()
    torch.nn.utils.clip_grad_norm_(params, CLIP)
    opt.step()

  calls = {"encoder_fwd": encoder, "beit3_fwd_bwd": text_fwd_bwd, "decoder_fwd_bwd": dec_fwd_bwd,
           "upsample_loss_fwd_bwd": head_fwd_bwd, "clip_adamw": clip_adamw}
  out = {}
  for name, fn in calls.items():
    t, _ = common.timed(fn, args.part_repeats, warmup=1)
    out[name] = t
  return out


# ---------------------------------------------------------------- parent


def child(role: str, args) -> dict:
  cmd = [sys.executable, "-m", "benchmarks.train_cpu", "--role", role, "--size", args.size, "--workdir", args.workdir,
         "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
         "--images", str(args.images), "--prompts", str(args.prompts), "--text-len", str(args.text_len),
         "--mask-size", str(args.mask_size), "--seed", str(args.seed), "--lr", repr(args.lr),
         "--weight-decay", repr(args.weight_decay), "--part-repeats", str(args.part_repeats)]
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
  if args.threads:
    env.update(OMP_NUM_THREADS=str(args.threads))
  env["PYTHONPATH"] = REPO + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if args.compile_cache and role == "ours":  # round 1 compiles cold and fills it, later rounds read it
    env["JAX_COMPILATION_CACHE_DIR"] = args.compile_cache
  t0 = time.perf_counter()
  r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
  if r.returncode:
    raise RuntimeError(f"{role} failed (rc {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-4000:]}")
  out = common.parse_results(r.stdout)
  out["process_s"] = time.perf_counter() - t0
  return out


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  ap.add_argument("--size", default="base", choices=["tiny", "base"])
  ap.add_argument("--quick", action="store_true", help="tiny model, small batch, 1 round of 2 steps (tests)")
  ap.add_argument("--images", type=int, default=2)
  ap.add_argument("--prompts", type=int, default=3, help="prompts per image (all valid)")
  ap.add_argument("--text-len", type=int, default=64, help="tokens per prompt after padding (data.max_text_len)")
  ap.add_argument("--mask-size", type=int, default=1024, help="loss resolution (0: SAM's input size)")
  ap.add_argument("--steps", type=int, default=3, help="timed steps per run")
  ap.add_argument("--warmup", type=int, default=1, help="untimed steps per run (ours: after compiling)")
  ap.add_argument("--rounds", type=int, default=None, help="ours / PyTorch runs, alternating (default 2; --quick: 1)")
  ap.add_argument("--parts", action="store_true", help="also time each part of the step alone, both sides")
  ap.add_argument("--part-repeats", type=int, default=3)
  ap.add_argument("--threads", type=int, default=2)
  ap.add_argument("--lr", type=float, default=1e-4)
  ap.add_argument("--weight-decay", type=float, default=0.05)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "evf_jax_bench"))
  ap.add_argument("--no-compile-cache", action="store_true",
                  help="every round compiles cold (default: rounds after the first read jax's persistent cache)")
  ap.add_argument("--out", default=None, help="write the RESULT json here too")
  ap.add_argument("--role", default="parent",
                  choices=["parent", "ours", "torch", "ours-parts", "torch-parts"])
  args = ap.parse_args()
  if args.quick:
    args.size, args.images, args.prompts, args.text_len, args.mask_size = "tiny", 2, 2, 8, 64
    args.steps, args.warmup, args.part_repeats = 2, 1, 1
  args.rounds = args.rounds or (1 if args.quick else 2)
  roles = {"ours": run_ours, "torch": run_torch, "ours-parts": run_ours_parts,
           "torch-parts": run_torch_parts}
  if args.role != "parent":
    common.emit(roles[args.role](args))
    return

  os.makedirs(args.workdir, exist_ok=True)
  args.compile_cache = None if args.no_compile_cache else tempfile.mkdtemp(prefix="evf_train_cpu_cc_")
  m = args.mask_size or model_config(args.size).sam.img_size
  setup = dict(size=args.size, images=args.images, prompts=args.prompts, text_len=args.text_len, mask_size=m,
               steps=args.steps, warmup=args.warmup, rounds=args.rounds, threads=args.threads, lr=args.lr,
               weight_decay=args.weight_decay, betas=BETAS, eps=EPS, clip=CLIP, dtype="float32",
               date=time.strftime("%Y-%m-%d"))
  print(f"setup: {json.dumps(setup)}", flush=True)
  prep = run_prepare(args)  # in this process: the children only read the file
  gc.collect()
  print(f"weights: {prep['path']} (converted in {prep['seconds']:.1f} s)", flush=True)
  runs = {"ours": [], "torch": []}
  for r in range(args.rounds):
    for side in ("ours", "torch"):
      res = child(side, args)
      runs[side].append(res)
      print(f"round {r + 1} {side}: median step {res['step_s']:.3f} s, steps {[round(t, 3) for t in res['step_all']]}"
            + (f", compile {res['compile_s']:.1f} s (+ trace/lower {res['trace_lower_s']:.1f} s)"
               if side == "ours" else "")
            + f", peak RSS {res['peak_rss_mib']:.0f} MiB (train {res['train_peak_rss_mib'] or float('nan'):.0f})",
            flush=True)
  parts = None
  if args.parts:
    parts = {"ours": child("ours-parts", args), "torch": child("torch-parts", args)}

  def med(side, key):
    return statistics.median([x for run in runs[side] for x in (run[key] if isinstance(run[key], list) else [run[key]])])
  ours_s, torch_s = med("ours", "step_all"), med("torch", "step_all")
  ratio = ours_s / torch_s
  ours_cpu, torch_cpu = med("ours", "cpu_all"), med("torch", "cpu_all")
  round_ratios = [o["step_s"] / t["step_s"] for o, t in zip(runs["ours"], runs["torch"])]
  o0, t0 = runs["ours"][0], runs["torch"][0]
  loss_diff = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(o0["losses"], t0["losses"]))
  result = dict(
      setup=setup, ours_step_s=ours_s, torch_step_s=torch_s, ratio=ratio, round_ratios=round_ratios,
      ours_step_cpu_s=ours_cpu, torch_step_cpu_s=torch_cpu, cpu_ratio=ours_cpu / torch_cpu,
      goal_ratio=0.8, goal_met=ratio <= 0.8,
      ours_compile_s=[r["compile_s"] for r in runs["ours"]], ours_trace_lower_s=[r["trace_lower_s"] for r in runs["ours"]],
      compile_cache=not args.no_compile_cache,
      ours_peak_rss_mib=max(r["peak_rss_mib"] for r in runs["ours"]),
      torch_peak_rss_mib=max(r["peak_rss_mib"] for r in runs["torch"]),
      ours_train_peak_rss_mib=max((r["train_peak_rss_mib"] or 0) for r in runs["ours"]) or None,
      torch_train_peak_rss_mib=max((r["train_peak_rss_mib"] or 0) for r in runs["torch"]) or None,
      losses=dict(ours=o0["losses"], torch=t0["losses"]), first_round_max_rel_loss_diff=loss_diff,
      counts=dict(ours=o0["counts"], torch=t0["counts"]), counts_match=all(o0["counts"][k] == t0["counts"][k] for k in ("trained", "decayed")),
      runs=runs, parts=parts, jax=o0["jax"], torch=t0["torch"])

  print(f"\nEVF-SAM {args.size} training step, fp32, {args.threads} threads; {args.images} images x {args.prompts} "
        f"prompts, text {args.text_len} tokens, loss at {m}x{m}; jax {o0['jax']} ({o0['backend']}), torch {t0['torch']}")
  print(f"{'':<46} {'ours':>10} {'PyTorch':>10} {'ratio':>8}")
  print(f"{'step time, median [s] (data-free)':<46} {ours_s:>10.3f} {torch_s:>10.3f} {ratio:>8.3f}"
        f"   (goal <= 0.8: {'met' if ratio <= 0.8 else 'NOT met'})")
  print(f"{'   per round: ours / PyTorch':<46} " + ", ".join(f"{x:.3f}" for x in round_ratios))
  print(f"{'CPU time per step, median [s] (all threads)':<46} {ours_cpu:>10.3f} {torch_cpu:>10.3f} "
        f"{ours_cpu / torch_cpu:>8.3f}")
  print(f"{'peak RSS, whole process [MiB]':<46} {result['ours_peak_rss_mib']:>10.0f} {result['torch_peak_rss_mib']:>10.0f} "
        f"{result['ours_peak_rss_mib'] / result['torch_peak_rss_mib']:>8.3f}")
  if result["ours_train_peak_rss_mib"] and result["torch_train_peak_rss_mib"]:
    print(f"{'peak RSS from compile/first step on [MiB]':<46} {result['ours_train_peak_rss_mib']:>10.0f} "
          f"{result['torch_train_peak_rss_mib']:>10.0f} "
          f"{result['ours_train_peak_rss_mib'] / result['torch_train_peak_rss_mib']:>8.3f}")
  print(f"{'ours: XLA compile [s], cold':<46} {result['ours_compile_s'][0]:>10.1f}   (+ trace/lower "
        f"{result['ours_trace_lower_s'][0]:.1f})")
  if len(runs["ours"]) > 1:
    print(f"{'   later runs' + ('' if args.no_compile_cache else ' (persistent cache)'):<46} "
          + ", ".join(f"{x:.1f}" for x in result["ours_compile_s"][1:]))
  print(f"losses, round 1: ours {[round(x, 5) for x in o0['losses']]}; PyTorch {[round(x, 5) for x in t0['losses']]} "
        f"(max rel diff {loss_diff:.1e})")
  print(f"parameters (frozen: PyTorch counts its buffers too): ours {o0['counts']}; PyTorch {t0['counts']}"
        + ("" if result["counts_match"] else "  TRAINED / DECAYED MISMATCH"))
  if parts:
    print(f"\nparts alone, median [s]{'':<23} {'ours':>10} {'PyTorch':>10} {'ratio':>8}")
    for key in ("encoder_fwd", "beit3_fwd_bwd", "decoder_fwd_bwd", "upsample_loss_fwd_bwd", "clip_adamw"):
      o, t = parts["ours"][key], parts["torch"][key]
      print(f"  {key:<44} {o:>10.3f} {t:>10.3f} {o / t:>8.3f}")
    so = sum(parts["ours"][k] for k in ("encoder_fwd", "beit3_fwd_bwd", "decoder_fwd_bwd", "upsample_loss_fwd_bwd",
                                          "clip_adamw"))
    st = sum(parts["torch"][k] for k in ("encoder_fwd", "beit3_fwd_bwd", "decoder_fwd_bwd", "upsample_loss_fwd_bwd",
                                           "clip_adamw"))
    print(f"  {'sum of parts':<44} {so:>10.3f} {st:>10.3f} {so / st:>8.3f}")
  common.emit(result)
  if args.out:
    with open(args.out, "w") as f:
      json.dump(result, f, indent=2, default=float)


if __name__ == "__main__":
  main()
