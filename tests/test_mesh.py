"""The training mesh over several TPU slices (multi-slice): each mesh axis spans the slices `dcn_mesh` gives it
and the rest of it lies inside a slice, so that by default only the data-parallel axis crosses the data-centre
network. Checked on stand-in device objects carrying a `slice_index` (what TPU devices of a multi-slice job
have); the compiled programs are in tests/test_train_compile.py (slow)."""

from __future__ import annotations

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from evf_jax import sharding
from evf_jax.errors import UserError


class _Device:
  """What `make_mesh` reads of a device of a multi-slice job."""

  def __init__(self, i: int, slice_index: int):
    self.id, self.slice_index, self.process_index = i, slice_index, slice_index
    self.platform = self.device_kind = "cpu"

  def __repr__(self):
    return f"d{self.id}@{self.slice_index}"


def _devices(slices: int, per_slice: int) -> list:
  return [_Device(i, i // per_slice) for i in range(slices * per_slice)]


def _slices_along(mesh, axis: str) -> set[int]:
  """How many slices the device groups along `axis` touch (1: every group stays inside a slice)."""
  arr = np.moveaxis(mesh.devices, mesh.axis_names.index(axis), -1).reshape(-1, mesh.shape[axis])
  return {len({d.slice_index for d in group}) for group in arr}


def test_by_default_only_the_data_axis_crosses_slices():
  mesh = sharding.make_mesh([("data", -1), ("fsdp", 4), ("tensor", 2)], _devices(4, 16))
  assert dict(mesh.shape) == {"data": 8, "fsdp": 4, "tensor": 2}
  assert _slices_along(mesh, "fsdp") == {1} and _slices_along(mesh, "tensor") == {1}
  assert _slices_along(mesh, "data") == {4}  # 8 data rows: 2 inside each of the 4 slices
  assert sorted(d.id for d in mesh.devices.flat) == list(range(64))


def test_dcn_mesh_puts_the_slices_on_the_named_axes():
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 8)], _devices(4, 4), dcn=[("data", 2), ("fsdp", -1)])
  assert _slices_along(mesh, "data") == {2} and _slices_along(mesh, "fsdp") == {2}
  # Each slice holds one (data, fsdp-half) block of the mesh.
  for i, block in enumerate((mesh.devices[:1, :4], mesh.devices[:1, 4:], mesh.devices[1:, :4], mesh.devices[1:, 4:])):
    assert len({d.slice_index for d in block.flat}) == 1, (i, block)


@pytest.mark.parametrize("mesh,dcn,slices,expect", [
    ([("data", 2), ("fsdp", 4)], [("tensor", -1)], 2, "'tensor' is not an axis of the mesh"),
    ([("data", 1), ("fsdp", 8)], [("data", -1)], 2, "mesh axis data (1 devices) cannot span 2 slices"),
    ([("data", 4), ("fsdp", 2)], [("data", 4)], 2, "spans 4 slice(s), but the devices are in 2"),
    ([("data", 4), ("fsdp", 2)], [("data", -1), ("fsdp", -1)], 2, "at most one -1"),
])
def test_a_dcn_mesh_that_does_not_fit_is_one_line(mesh, dcn, slices, expect):
  with pytest.raises(UserError) as e:
    sharding.make_mesh(mesh, _devices(slices, 8 // slices), dcn=dcn)
  assert expect in str(e.value) and "\n" not in str(e.value)


def test_one_slice_is_jax_make_mesh():
  """CPUs, GPUs and single-slice TPUs: the layout is jax.make_mesh's, whatever dcn_mesh says."""
  spec = [("data", 2), ("fsdp", 4)]
  ours = sharding.make_mesh(spec, jax.devices()[:8], dcn=[("fsdp", -1)])
  theirs = jax.make_mesh((2, 4), ("data", "fsdp"), devices=jax.devices()[:8])
  assert [d.id for d in ours.devices.flat] == [d.id for d in theirs.devices.flat]
  with pytest.raises(UserError, match="'dta' is not an axis"):  # a misspelt axis is refused before a pod
    sharding.make_mesh(spec, jax.devices()[:8], dcn=[("dta", -1)])


def test_the_batch_is_split_over_data_and_fsdp():
  """FSDP is data parallel too: the batch dimension goes over both axes (the rule's whole target), or over the
  ones the mesh has."""
  rules = sharding.DEFAULT_RULES
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)], jax.devices()[:8])
  assert sharding.batch_axes(mesh, sharding.rules_for(mesh, rules)) == ("data", "fsdp")
  assert sharding.batch_sharding(mesh, sharding.rules_for(mesh, rules)).spec == jax.sharding.PartitionSpec(
      ("data", "fsdp"))
  mesh = sharding.make_mesh([("data", 2), ("tensor", 4)], jax.devices()[:8])
  assert sharding.batch_axes(mesh, sharding.rules_for(mesh, rules)) == ("data",)


def test_mesh_shape_fills_in_the_one_minus_one_and_names_each_mistake():
  assert sharding.mesh_shape([("data", -1), ("fsdp", 2), ("tensor", 1)], 8) == (("data", "fsdp", "tensor"), (4, 2, 1))
  assert sharding.mesh_shape([("data", 2), ("fsdp", 4)], 8) == (("data", "fsdp"), (2, 4))
  for spec, expect in (([("data", -1), ("fsdp", -1)], "sizes must be positive, with at most one -1"),
                       ([("data", 8), ("fsdp", 0)], "sizes must be positive, with at most one -1"),
                       ([("data", -1), ("fsdp", 3)], "8 devices are not a multiple of 3"),
                       ([("data", 2), ("data", 4)], "repeated axis names"),
                       ([("data", 2), ("fsdp", 2)], "has 4 devices, but there are 8")):
    with pytest.raises(UserError, match=re.escape(expect)):
      sharding.mesh_shape(spec, 8)
  # An axis of one device that no rule uses repeats nothing: allowed; of two, refused.
  sharding.check_axes_used([("data", -1), ("spare", 1)], 8, sharding.DEFAULT_RULES)
  with pytest.raises(UserError, match=re.escape("mesh axis 'spare' (2 devices) is not one the sharding rules use")):
    sharding.check_axes_used([("data", -1), ("spare", 2)], 8, sharding.DEFAULT_RULES)


def test_a_dimension_over_two_axes_falls_back_unless_their_product_divides_it():
  """A rule may split one dimension over several mesh axes: 12 rows divide over data=2 but not over data x fsdp=8,
  so they are replicated (and reported); 16 rows are split. Rules may name axes the mesh lacks (tensor here)."""
  mesh = sharding.make_mesh([("data", 2), ("fsdp", 4)], jax.devices()[:8])
  s = jax.ShapeDtypeStruct
  boxed = {"w": nn.Partitioned(s((12, 16), jnp.float32), names=("embed", "mlp")),
           "v": nn.Partitioned(s((16, 6), jnp.float32), names=("embed", "mlp"))}
  shards, report = sharding.param_shardings(boxed, mesh, [("embed", ("data", "fsdp")), ("mlp", "tensor")])
  assert sharding.describe(shards) == {"w": str(P(None, None)), "v": str(P(("data", "fsdp"), None))}
  assert report == ["w: dim 0 (12) over dataxfsdp=8"]
