"""Checkpoint restore refuses, in one line, a checkpoint whose state tree differs from the run's (written by a
version of this code that split trained and frozen parameters differently), and leaves it on disk; Muon's state
(trees with the other partition's leaves masked out) saves and restores exactly; a workdir written before the
optimizer settings existed resumes as the AdamW run it was; small replicated arrays are saved without a compiled
slice op each; the best checkpoint by gIoU survives a restart, and saves between evaluations log nothing."""

from __future__ import annotations

import copy
import logging
import os

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from evf_jax.errors import UserError
from evf_jax.train import checkpointing, optimizer
from evf_jax.train import config as train_config
from evf_testing.training import assert_same_tree


def _iterator():
  return iter(grain.MapDataset.range(8).to_iter_dataset())


def _abstract(state):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)


def test_a_state_of_another_tree_is_refused_in_one_line(tmp_path):
  mngr = checkpointing.manager(str(tmp_path), keep=2)
  older = {"params": {"a": jnp.ones(3), "pe": jnp.ones(2)}, "frozen": {}}
  assert checkpointing.save(mngr, 1, older, _iterator(), force=True)
  mngr.wait_until_finished()
  now = {"params": {"a": jnp.ones(3)}, "frozen": {"pe": jnp.ones(2)}}
  with pytest.raises(UserError, match="another split of trained and frozen parameters") as e:
    checkpointing.restore(mngr, 1, _abstract(now), _iterator())
  assert "\n" not in str(e.value)
  assert os.listdir(os.path.join(str(tmp_path), checkpointing.CHECKPOINT_DIR)) == ["1"]
  same = checkpointing.restore(mngr, 1, _abstract(older), _iterator())
  assert float(same["params"]["pe"][0]) == 1.0


def test_the_data_position_is_restored_with_the_state(tmp_path):
  """A resumed run reads on from the saved position (the slow tier's resume tests show the whole run equal)."""
  mngr = checkpointing.manager(str(tmp_path), keep=2)
  state = {"params": {"a": jnp.arange(3.0)}}
  it = _iterator()
  assert [int(next(it)) for _ in range(3)] == [0, 1, 2]
  assert checkpointing.save(mngr, 3, state, it, force=True)
  mngr.wait_until_finished()
  fresh = _iterator()
  back = checkpointing.restore(mngr, 3, _abstract(state), fresh)
  assert [int(next(fresh)) for _ in range(2)] == [3, 4]
  np.testing.assert_array_equal(back["params"]["a"], state["params"]["a"])


def test_a_muon_state_round_trips(tmp_path):
  tx = optimizer.muon(optax.constant_schedule(1e-2))
  params = {"dense": {"kernel": jnp.arange(12.0).reshape(4, 3), "bias": jnp.ones(3)}, "norm": {"scale": jnp.ones(3)}}
  opt_state = tx.init(params)
  grads = jax.tree.map(lambda x: jnp.cos(x) + 0.5, params)
  _, opt_state = tx.update(grads, opt_state, params)  # moments that are not zeros
  state = {"params": params, "opt_state": opt_state}
  mngr = checkpointing.manager(str(tmp_path), keep=2)
  assert checkpointing.save(mngr, 1, state, _iterator(), force=True)
  mngr.wait_until_finished()
  back = checkpointing.restore(mngr, 1, _abstract(state), _iterator())
  assert jax.tree.structure(back) == jax.tree.structure(state)
  assert_same_tree(state, back)
  moments = [v for _, v in optax.tree_utils.tree_get_all_with_path(back, "mu")]
  assert any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(moments))


def test_the_best_checkpoint_survives_a_resumed_run_that_evaluates_nothing(tmp_path):
  """A run resumed with `--config.evals=()` saves without metrics: the earlier run's best stays (it was pruned
  when such a run's manager had no BestN policy), beside the latest `keep`."""
  state = {"params": {"a": jnp.ones(3)}}
  mngr = checkpointing.manager(str(tmp_path), keep=2)
  for step, giou in ((2, 0.5), (4, 0.1)):
    assert checkpointing.save(mngr, step, state, _iterator(), metrics={checkpointing.BEST_METRIC: giou})
  mngr.wait_until_finished()
  resumed = checkpointing.manager(str(tmp_path), keep=2)
  for step in (6, 8, 10):
    assert checkpointing.save(resumed, step, state, _iterator())
  resumed.wait_until_finished()
  assert sorted(resumed.all_steps()) == [2, 8, 10]


def test_a_diverged_run_resumes_with_a_lower_lr_but_not_another_loss():
  """What the divergence message advises (a lower lr, a longer warmup) and what only memory or speed depend on
  may change on resume; grad_accum may not (with loss.images_per_group 0 it changes the loss)."""
  saved = train_config.base_config().to_dict()
  current = copy.deepcopy(saved)
  current["optimizer"]["lr"] /= 10
  current["optimizer"]["warmup_steps"] *= 2
  current["remat"] = not saved["remat"]
  current["data"]["cache_images"] = not saved["data"]["cache_images"]
  assert sorted(checkpointing.check_resume(saved, current, "W")) == [
      "data.cache_images", "optimizer.lr", "optimizer.warmup_steps", "remat"]
  current["grad_accum"] = 2
  with pytest.raises(UserError, match="W was trained with grad_accum=1, this run has 2"):
    checkpointing.check_resume(saved, current, "W")


def test_another_model_is_named_before_other_differences():
  """A workdir of another model and batch size: the model is named (the hint to change batch_size first led
  through a chain of refusals)."""
  saved = train_config.base_config().to_dict()
  current = copy.deepcopy(saved)
  current["batch_size"] = saved["batch_size"] * 2
  current["model"]["multimask_output"] = True
  with pytest.raises(UserError, match="model.multimask_output is only in this run's config"):
    checkpointing.check_resume(saved, current, "W")


def test_a_resume_that_changes_the_split_the_best_is_chosen_by_is_refused():
  saved = train_config.base_config().to_dict()
  saved["evals"] = ("refcoco|unc|val", "refcoco+|unc|val")
  current = copy.deepcopy(saved)
  current["evals"] = ("refcoco|unc|val",)  # others may go, or none be evaluated
  assert checkpointing.check_resume(saved, current, "W") == ["evals"]
  current["evals"] = ()
  assert checkpointing.check_resume(saved, current, "W") == ["evals"]
  current["evals"] = ("refcoco+|unc|val", "refcoco|unc|val")
  with pytest.raises(UserError, match="W keeps its best checkpoint by the gIoU of its first eval split, "
                                      "'refcoco|unc|val'; this run's first is 'refcoco+|unc|val'"):
    checkpointing.check_resume(saved, current, "W")


def test_a_workdir_from_before_the_optimizer_settings_resumes_as_adamw():
  current = train_config.base_config().to_dict()
  saved = copy.deepcopy(current)
  del saved["optimizer"]["name"], saved["optimizer"]["muon_momentum"]
  assert checkpointing.check_resume(saved, current, "W") == []
  current["optimizer"]["name"] = "muon"
  with pytest.raises(UserError, match="W was trained with optimizer.name='adamw', this run has 'muon'; set "
                                      "--config.optimizer.name to 'adamw' to resume it"):
    checkpointing.check_resume(saved, current, "W")


def test_a_workdir_from_before_the_loss_groups_names_the_setting_that_resumes_it():
  """Written before loss.images_per_group existed: it trained with one mean over the batch (0), which the
  message names; a setting only one side has (another model family) is named as such."""
  current = train_config.base_config().to_dict()
  saved = copy.deepcopy(current)
  del saved["loss"]["images_per_group"]
  with pytest.raises(UserError, match="set --config.loss.images_per_group to 0 to resume it"):
    checkpointing.check_resume(saved, current, "W")
  current["loss"]["images_per_group"] = 0
  assert checkpointing.check_resume(saved, current, "W") == []
  current["model"]["multimask_output"] = True
  with pytest.raises(UserError, match="W was trained with another configuration: model.multimask_output is only in "
                                      "this run's config"):
    checkpointing.check_resume(saved, current, "W")


def test_small_replicated_arrays_are_saved_without_compiling(tmp_path):
  """On 8 devices a replicated state is saved with no compile for its small arrays (orbax would cut each into 8
  slices with an op compiled per shape); a large one is still split over the replicas; all restore exactly."""
  devices = jax.devices()
  assert len(devices) == 8
  replicated = jax.sharding.NamedSharding(jax.sharding.Mesh(np.array(devices), ("data",)),
                                          jax.sharding.PartitionSpec())
  small = {f"w{i}": jnp.arange(8.0 * (i + 1)).reshape(8, i + 1) for i in range(12)}  # 12 shapes
  state = jax.device_put({"small": small, "large": jnp.arange(8 * 262144.0).reshape(8, 262144)}, replicated)
  compiles = []

  def listen(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
      compiles.append(duration)

  mngr = checkpointing.manager(str(tmp_path), keep=2)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    assert checkpointing.save(mngr, 1, {"small": state["small"]}, _iterator(), force=True)
    mngr.wait_until_finished()
    small_compiles = len(compiles)
    assert checkpointing.save(mngr, 2, state, _iterator(), force=True)
    mngr.wait_until_finished()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert small_compiles == 0
  assert len(compiles) > 0  # the 8 MiB array is cut into 1 MiB replica slices
  assert_same_tree(state, checkpointing.restore(mngr, 2, _abstract(state), _iterator()))


def test_the_best_checkpoint_survives_a_restart(tmp_path, caplog):
  """Keep 1 latest plus the best by gIoU: the best (an early step) is still kept after the manager is opened
  again, as a resumed run opens it, and later steps are saved (their metrics are read back from disk)."""
  state = {"w": jnp.arange(4.0)}
  mngr = checkpointing.manager(str(tmp_path), keep=1)
  checkpointing.save(mngr, 1, state, _iterator(), {"giou": 0.9, "ciou": 0.5})
  checkpointing.save(mngr, 2, state, _iterator(), {"giou": 0.1, "ciou": 0.1})
  mngr.wait_until_finished()
  mngr.close()
  mngr = checkpointing.manager(str(tmp_path), keep=1)
  assert mngr.best_step() == 1  # read back from disk
  with caplog.at_level(logging.WARNING):
    for step in (3, 4):  # saves between evaluations: no metrics, and no warning about it in the run's log
      checkpointing.save(mngr, step, state, _iterator(), force=True)
    mngr.wait_until_finished()
  assert not [r for r in caplog.records if "metrics" in r.getMessage()], caplog.text
  assert mngr.all_steps() == [1, 4]
  mngr.close()
