"""Meshes and logical-axis sharding: the mapping from the models' logical axis names to mesh axes lives in
configs, never in model code.

Every parameter carries logical axis names (`evf_jax.layers`): `embed` (model width), `mlp`, `heads`,
`vocab`, `norm`, `conv_h`/`conv_w`; activations at block boundaries are constrained to `batch` on their first
axis. A config gives the mesh as `[("data", -1), ("fsdp", 1), ("tensor", 1)]` (-1: the devices left over) and
the rules as `[("batch", ("data", "fsdp")), ("embed", "fsdp"), ...]`. Rules apply per dimension in order; a
dimension the mesh axes do not divide is replicated instead (e.g. BEiT-3's 64010-row text embedding over an
even `fsdp` axis), and `param_shardings` reports each such fallback.

The same code runs on one CPU, simulated CPU devices, a GPU, GPU clusters and TPU pod slices: only the mesh
changes. Constraints take effect under `jax.set_mesh(mesh)` and `nn.logical_axis_rules(rules)` (`activate`).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from evf_jax.errors import UserError, first_line

MeshSpec = Sequence[tuple[str, int]]
Rules = Sequence[tuple[str, Any]]

# FSDP over "fsdp" for every large matrix, tensor parallelism over "tensor" for the wide dimensions of the
# MLPs, attention projections and the vocabulary, and the batch over "data" x "fsdp".
DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("conv_h", None),
    ("conv_w", None),
)


def mesh_shape(spec: MeshSpec, num_devices: int) -> tuple[tuple[str, ...], tuple[int, ...]]:
  """Axis names and sizes for `num_devices`, the one -1 axis (if any) taking what the others leave."""
  names = tuple(str(n) for n, _ in spec)
  sizes = [int(s) for _, s in spec]
  if len(set(names)) != len(names):
    raise UserError(f"mesh {list(spec)}: repeated axis names")
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh {list(spec)}: sizes must be positive, with at most one -1")
  fixed = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if num_devices % fixed:
      raise UserError(f"mesh {list(spec)}: {num_devices} devices are not a multiple of {fixed}")
    sizes[sizes.index(-1)] = num_devices // fixed
  if math.prod(sizes) != num_devices:
    raise UserError(f"mesh {list(spec)} has {math.prod(sizes)} devices, but there are {num_devices}")
  return names, tuple(sizes)


# How the slices of a multi-slice TPU job (joined by the data-centre network, DCN, far slower than the links
# inside a slice) divide among the mesh axes: all on "data" by default, so that only the gradients' reduction
# and the batch split cross DCN, while FSDP's gathers and tensor parallelism stay inside a slice.
DEFAULT_DCN_MESH: tuple[tuple[str, int], ...] = (("data", -1),)

# jax.make_mesh lets these chips split a physical axis between mesh axes; the multi-slice layout does the same.
_SPLIT_PHYSICAL_AXES = ("TPU v5 lite", "TPU v5e")


def slice_count(devices: Sequence[jax.Device]) -> int:
  """How many TPU slices `devices` span (1 for devices without a slice index: CPUs, GPUs)."""
  return len({getattr(d, "slice_index", 0) for d in devices})


def _check_dcn_axes(dcn: MeshSpec, names: Sequence[str]) -> None:
  for name, _ in dcn:
    if name not in names:
      raise UserError(f"dcn_mesh: {name!r} is not an axis of the mesh {list(names)}")


def dcn_shape(dcn: MeshSpec, names: Sequence[str], sizes: Sequence[int], slices: int) -> tuple[int, ...]:
  """For each mesh axis (`names`, `sizes`), how many slices it spans; the one -1 in `dcn` takes what the
  others leave. Each axis's size must be a multiple of its slice count (the rest of it lies inside a slice)."""
  _check_dcn_axes(dcn, names)
  across = {n: 1 for n in names}
  fill = [str(n) for n, s in dcn if int(s) == -1]
  for name, size in dcn:
    if (int(size) < 1 and int(size) != -1) or len(fill) > 1:
      raise UserError(f"dcn_mesh {list(dcn)}: sizes must be positive, with at most one -1")
    if int(size) != -1:
      across[name] = int(size)
  fixed = math.prod(across.values())
  if fill:
    across[fill[0]] = max(1, slices // fixed)
  if math.prod(across.values()) != slices:
    raise UserError(f"dcn_mesh {list(dcn)} spans {math.prod(across.values())} slice(s), but the devices are in "
                    f"{slices}")
  for name, size in zip(names, sizes):
    if size % across[name]:
      raise UserError(f"mesh axis {name} ({size} devices) cannot span {across[name]} slices (dcn_mesh "
                      f"{list(dcn)})")
  return tuple(across[n] for n in names)


def make_mesh(spec: MeshSpec, devices: Optional[Sequence[jax.Device]] = None,
              dcn: MeshSpec = DEFAULT_DCN_MESH) -> Mesh:
  """A mesh of `devices` (default: all devices of all processes) with Auto axes (what flax.linen's logical
  constraints need), laid out for the hardware's topology: by `jax.make_mesh` within one slice; over several
  TPU slices, each axis spans the slices `dcn` gives it (`dcn_shape`) and is laid out inside each slice by
  jax's hybrid mesh (`jax.make_mesh` refuses several slices)."""
  devices = list(jax.devices() if devices is None else devices)
  names, sizes = mesh_shape(spec, len(devices))
  auto = (AxisType.Auto,) * len(names)
  slices = slice_count(devices)
  if slices == 1:
    _check_dcn_axes(dcn, names)  # a config's mistake shows before it reaches a pod
    return jax.make_mesh(sizes, names, axis_types=auto, devices=devices)
  across = dcn_shape(dcn, names, sizes, slices)
  inside = tuple(s // a for s, a in zip(sizes, across))
  try:
    arranged = mesh_utils.create_hybrid_device_mesh(
        inside, across, devices, allow_split_physical_axes=devices[0].device_kind in _SPLIT_PHYSICAL_AXES)
  except (ValueError, NotImplementedError, AssertionError) as e:
    raise UserError(f"mesh {dict(zip(names, sizes))} over {slices} slices ({dict(zip(names, inside))} inside "
                    f"each): {first_line(e)}") from None
  return Mesh(arranged, names, axis_types=auto)


def _axes(target: Any) -> tuple[str, ...]:
  return (target,) if isinstance(target, str) else tuple(target or ())


def rules_for(mesh: Mesh, rules: Rules) -> tuple[tuple[str, Any], ...]:
  """`rules` with the mesh axes `mesh` does not have removed (a 1-D data mesh drops fsdp and tensor)."""
  out = []
  for name, target in rules:
    axes = tuple(a for a in _axes(target) if a in mesh.axis_names)
    out.append((name, None if not axes else axes[0] if len(axes) == 1 else axes))
  return tuple(out)


def check_axes_used(spec: MeshSpec, num_devices: int, rules: Rules) -> None:
  """UserError for a mesh axis of more than one device that no rule shards over (a misspelt name): its devices
  would only repeat the others' work."""
  used = {a for _, target in rules for a in _axes(target)}
  for name, size in zip(*mesh_shape(spec, num_devices)):
    if size > 1 and name not in used:
      raise UserError(f"mesh axis {name!r} ({size} devices) is not one the sharding rules use "
                      f"({', '.join(sorted(used))}): its devices would repeat the others' work")


def batch_axes(mesh: Mesh, rules: Rules) -> tuple[str, ...]:
  """The mesh axes the batch dimension is split over (the rule for `batch`, axes the mesh has)."""
  for name, target in rules_for(mesh, rules):
    if name == "batch":
      return _axes(target)
  return ()


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Leading (batch) axis split over the batch axes; everything else replicated."""
  return NamedSharding(mesh, P(batch_axes(mesh, rules) or None))


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> tuple[P, list[str]]:
  """`spec` with every mesh axis that does not divide its dimension dropped; and what was dropped."""
  out, dropped = [], []
  for dim, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      out.append(None)
      continue
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    size = math.prod(mesh.shape[a] for a in axes)
    if shape[dim] % size:
      dropped.append(f"dim {dim} ({shape[dim]}) over {'x'.join(axes)}={size}")
      out.append(None)
    else:
      out.append(axes[0] if len(axes) == 1 else axes)
  return P(*out), dropped


def param_shardings(boxed_abstract: Any, mesh: Mesh, rules: Rules) -> tuple[Any, list[str]]:
  """NamedShardings for a boxed abstract parameter tree (`abstract_params(config, boxed=True)`), and the
  fallbacks to replication, one line per parameter ("path: dim 0 (64010) over fsdp=2")."""
  specs = nn.get_partition_spec(boxed_abstract)
  shapes = nn.unbox(boxed_abstract)
  rules = rules_for(mesh, rules)
  report: list[str] = []

  def one(path, spec, leaf):
    fitted, dropped = _fit(nn.logical_to_mesh_axes(tuple(spec), rules), leaf.shape, mesh)
    report.extend(f"{jax.tree_util.keystr(path, simple=True, separator='/')}: {d}" for d in dropped)
    return NamedSharding(mesh, fitted)

  return jax.tree_util.tree_map_with_path(one, specs, shapes, is_leaf=lambda x: isinstance(x, P)), report


def describe(shardings: Any) -> dict[str, str]:
  """{"path": "PartitionSpec(...)"} for logs and tests."""
  flat = jax.tree_util.tree_flatten_with_path(shardings)[0]
  return {jax.tree_util.keystr(p, simple=True, separator="/"): str(s.spec) for p, s in flat}


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules) -> Iterator[None]:
  """Makes the models' logical constraints take effect (both the mesh and the rules are needed)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules_for(mesh, rules)):
    yield


def global_batch(host_batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
  """This process's rows of a batch -> global arrays split along the leading axis by `sharding`."""
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in host_batch.items()}


def put_global(tree: Any, shardings: Any) -> Any:
  """Host arrays every process holds in full -> global arrays with `shardings` (each process keeps its part)."""
  def one(x, s):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, s, lambda idx: x[idx])
  return jax.tree.map(one, tree, shardings)
