"""Checkpoints: strict restore with a clear error for another model's shapes, best-by-metric
kept in step with the disk, and a corrupt latest step that falls back to the next older one."""
import json
import shutil

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt.train import checkpoint as ckpt_lib


def _state(width: int, blocks: int = 1):
  params = {"encoder": {f"block_{i}": {"kernel": jnp.ones((width, width))} for i in range(blocks)}}
  return {"params": params, "model_state": {}, "opt": (jnp.zeros(()),), "step": jnp.int32(3)}


def _iterator(position: int = 0):
  """A grain iterator over 0..99 that has yielded `position` records."""
  loader = grain.DataLoader(
      data_source=list(range(100)),
      sampler=grain.samplers.IndexSampler(num_records=100, shuffle=False, num_epochs=1, seed=0),
      worker_count=0, shard_options=grain.sharding.NoSharding())
  iterator = iter(loader)
  for _ in range(position):
    next(iterator)
  return iterator


def test_roundtrip_and_best(tmp_path):
  ckpt = ckpt_lib.RunCheckpointer(tmp_path, keep=1, best_metric="val/auc")
  ckpt.save(3, _state(4), {"base_checkpoint": None})
  ckpt.save_best(3, {"params": _state(4)["params"]}, {"val/auc": 0.7})
  ckpt.save_best(4, {"params": jax.tree.map(lambda x: 2 * x, _state(4)["params"])}, {"val/auc": 0.6})
  ckpt.wait()
  state, data = ckpt.restore(ckpt_lib.abstract_of(_state(4)))
  assert int(state["step"]) == 3 and data == {"base_checkpoint": None, "process_count": 1}
  assert ckpt.best_step() == 3  # The worse evaluation at step 4 did not replace it.
  best = ckpt.restore_best(ckpt_lib.abstract_of({"params": _state(4)["params"]}))
  np.testing.assert_array_equal(best["params"]["encoder"]["block_0"]["kernel"], np.ones((4, 4)))
  ckpt.close()


@pytest.mark.parametrize("mode,values,saved", [
    ("max", [0.7, 0.6, 0.7, float("nan"), 0.8], [True, False, False, False, True]),
    ("min", [0.7, 0.6, 0.9], [True, True, False]),
])
def test_best_writes_only_improvements(tmp_path, mode, values, saved):
  ckpt = ckpt_lib.RunCheckpointer(tmp_path, best_metric="val/x", best_mode=mode)
  weights = {"params": _state(4)["params"]}
  assert [ckpt.save_best(i, weights, {"val/x": v}) for i, v in enumerate(values)] == saved
  assert ckpt.best_step() == max(i for i, s in enumerate(saved) if s)
  ckpt.close()


def test_resumed_best_keeps_the_saved_value(tmp_path):
  weights = {"params": _state(4)["params"]}
  first = ckpt_lib.RunCheckpointer(tmp_path, best_metric="val/auc")
  first.save_best(3, weights, {"val/auc": 0.7})
  first.wait()
  first.close()
  resumed = ckpt_lib.RunCheckpointer(tmp_path, best_metric="val/auc")
  assert not resumed.save_best(4, weights, {"val/auc": 0.65})
  assert resumed.save_best(5, weights, {"val/auc": 0.75})
  assert resumed.best_step() == 5
  resumed.close()


@pytest.mark.parametrize("other,message", [
    (_state(8), r"encoder/block_0/kernel: saved \(4, 4\) vs model \(8, 8\)"),
    (_state(4, blocks=2), r"missing from the checkpoint \(1\): \['params/encoder/block_1/kernel'\]"),
])
def test_restore_into_another_model_is_a_clear_error(tmp_path, other, message):
  ckpt = ckpt_lib.RunCheckpointer(tmp_path)
  ckpt.save(1, _state(4), {})
  ckpt.wait()
  with pytest.raises(ValueError, match=message):
    ckpt.restore(ckpt_lib.abstract_of(other))
  ckpt.close()


def _weights(value: float):
  return {"params": jax.tree.map(lambda x: value * x, _state(4)["params"])}


def _kernel(weights) -> float:
  return float(weights["params"]["encoder"]["block_0"]["kernel"][0, 0])


def test_better_best_at_an_earlier_step_replaces_the_saved_one(tmp_path):
  """A resumed run re-runs steps: a better evaluation at a step <= the saved best step is
  written (orbax saves no step below its latest), and memory and disk agree afterwards."""
  first = ckpt_lib.RunCheckpointer(tmp_path, best_metric="val/auc")
  assert first.save_best(6, _weights(6.0), {"val/auc": 0.8})
  first.close()
  resumed = ckpt_lib.RunCheckpointer(tmp_path, best_metric="val/auc")
  assert resumed.save_best(5, _weights(5.0), {"val/auc": 0.9})
  assert resumed.best_step() == 5
  abstract = ckpt_lib.abstract_of(_weights(0.0))
  assert _kernel(resumed.restore_best(abstract)) == 5.0
  # 0.85 beats the 0.8 of the replaced step 6, not the 0.9 of step 5: nothing is written.
  assert not resumed.save_best(8, _weights(8.0), {"val/auc": 0.85})
  assert resumed.save_best(9, _weights(9.0), {"val/auc": 0.95})
  resumed.close()
  again = ckpt_lib.RunCheckpointer(tmp_path, best_metric="val/auc")
  assert again.best_step() == 9 and _kernel(again.restore_best(abstract)) == 9.0
  assert not again.save_best(10, _weights(10.0), {"val/auc": 0.9})
  again.close()


def test_undefined_best_metric_never_improves(tmp_path):
  ckpt = ckpt_lib.RunCheckpointer(tmp_path, best_metric="val/auc")
  assert not ckpt.save_best(1, _weights(1.0), {"val/auc": None})
  assert ckpt.best_step() is None
  ckpt.close()


def test_a_refused_save_is_an_error(tmp_path):
  ckpt = ckpt_lib.RunCheckpointer(tmp_path)
  ckpt.save(4, _state(4), {})
  ckpt.wait()
  with pytest.raises(ckpt_lib.CheckpointError, match="did not save step 3"):
    ckpt.save(3, _state(4), {})
  ckpt.close()


def _truncate_arrays(step_dir):
  files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
  assert files
  for path in files:
    path.write_bytes(path.read_bytes()[:10])


def _empty(step_dir):
  shutil.rmtree(step_dir)
  step_dir.mkdir()


CORRUPTIONS = {
    "truncated_array_file": _truncate_arrays,
    "bad_metadata": lambda d: (d / "state" / "_METADATA").write_text("{not json"),
    "garbage_data_json": lambda d: (d / "data" / "metadata").write_text("garbage"),
    "garbage_iterator_json": lambda d: (d / "iterator" / "process_0-of-1.json").write_text("{x"),
    "missing_iterator_file": lambda d: (d / "iterator" / "process_0-of-1.json").unlink(),
    "empty_step_dir": _empty,
}


def _three_steps(root):
  ckpt = ckpt_lib.RunCheckpointer(root, keep=3)
  for step in (2, 4, 6):
    state = dict(_state(4), step=jnp.int32(step))
    ckpt.save(step, state, {"base_checkpoint": None}, _iterator(step))
  ckpt.close()


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupt_latest_falls_back_to_the_next_older_step(tmp_path, capsys, corruption):
  _three_steps(tmp_path)
  CORRUPTIONS[corruption](tmp_path / "ckpt" / "6")
  ckpt = ckpt_lib.RunCheckpointer(tmp_path, keep=3)
  iterator = _iterator()
  state, _, step = ckpt.restore_latest(ckpt_lib.abstract_of(_state(4)), iterator=iterator)
  assert step == 4 and int(state["step"]) == 4 and next(iterator) == 4
  err = capsys.readouterr().err
  assert f"checkpoint {tmp_path / 'ckpt' / '6'} cannot be restored" in err
  assert f"moved the unreadable checkpoint of step 6 to {tmp_path / 'corrupt' / 'ckpt_6'}" in err
  assert not (tmp_path / "ckpt" / "6").exists() and (tmp_path / "corrupt" / "ckpt_6").is_dir()
  ckpt.save(6, _state(4), {}, iterator)  # Training saves step 6 again.
  ckpt.wait()
  assert ckpt.latest_step() == 6
  ckpt.close()


def test_a_failing_check_falls_back_too(tmp_path):
  """The caller's check (finite values, an iterator state the loader takes) skips a step."""
  _three_steps(tmp_path)
  ckpt = ckpt_lib.RunCheckpointer(tmp_path, keep=3)

  def check(step, state, data):
    if step == 6:
      raise ValueError("iterator state refused")

  assert ckpt.restore_latest(ckpt_lib.abstract_of(_state(4)), check)[2] == 4
  ckpt.close()


def test_no_readable_step_says_what_to_delete(tmp_path):
  _three_steps(tmp_path)
  for step in (2, 4, 6):
    _empty(tmp_path / "ckpt" / str(step))
  ckpt = ckpt_lib.RunCheckpointer(tmp_path, keep=3)
  with pytest.raises(ckpt_lib.CheckpointError) as error:
    ckpt.restore_latest(ckpt_lib.abstract_of(_state(4)))
  message = str(error.value)
  assert f"rm -r {tmp_path / 'ckpt' / '6'} {tmp_path / 'ckpt' / '4'} {tmp_path / 'ckpt' / '2'}" in message
  assert all((tmp_path / "ckpt" / str(s)).exists() for s in (2, 4, 6))  # Nothing moved.
  ckpt.close()


def test_another_model_is_an_error_not_a_corruption(tmp_path):
  _three_steps(tmp_path)
  ckpt = ckpt_lib.RunCheckpointer(tmp_path, keep=3)
  with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match="saved \\(4, 4\\) vs model \\(8, 8\\)"):
    ckpt.restore_latest(ckpt_lib.abstract_of(_state(8)))
  assert sorted(ckpt._latest.all_steps()) == [2, 4, 6]  # pylint: disable=protected-access
  ckpt.close()


def test_each_process_saves_and_restores_its_own_iterator_state(tmp_path):
  """grain's handler writes process_<i>-of-<n>.json: on a pod no process takes another's."""
  ckpt = ckpt_lib.RunCheckpointer(tmp_path)
  ckpt.save(5, _state(4), {}, _iterator(5))
  ckpt.wait()
  assert sorted(p.name for p in (tmp_path / "ckpt" / "5" / "iterator").glob("*.json")) == [
      "process_0-of-1.json"]
  iterator = _iterator()
  ckpt.restore(ckpt_lib.abstract_of(_state(4)), iterator=iterator)
  assert [next(iterator) for _ in range(3)] == [5, 6, 7]
  ckpt.close()


def test_a_checkpoint_of_another_process_count_is_refused_not_set_aside(tmp_path):
  ckpt = ckpt_lib.RunCheckpointer(tmp_path)
  ckpt.save(2, _state(4), {}, _iterator(2))
  ckpt.wait()
  metadata = tmp_path / "ckpt" / "2" / "data" / "metadata"
  metadata.write_text(json.dumps(dict(json.loads(metadata.read_text()), process_count=2)))
  with pytest.raises(ckpt_lib.IncompatibleCheckpoint, match=r"saved by 2 process\(es\) and this run has 1"):
    ckpt.restore_latest(ckpt_lib.abstract_of(_state(4)), iterator=_iterator())
  assert (tmp_path / "ckpt" / "2").is_dir()  # Not moved to corrupt/.
  ckpt.close()


def test_the_older_one_state_layout_still_resumes(tmp_path):
  """Checkpoints written before the per-process layout keep their state in data['iterator']."""
  ckpt = ckpt_lib.RunCheckpointer(tmp_path)
  ckpt.save(4, _state(4), {"iterator": _iterator(4).get_state().decode()})
  ckpt.wait()
  iterator = _iterator()
  ckpt.restore(ckpt_lib.abstract_of(_state(4)), iterator=iterator)
  assert next(iterator) == 4
  ckpt.close()


def test_each_manager_has_barriers_of_its_own(tmp_path):
  """Orbax names an async save's barriers after the step's folder, the same in ckpt/ and best/:
  without a prefix of their own, two managers saving one step on several processes pass each
  other's barriers (process 0 finalized best/20 before process 1 had written its part)."""
  runs = [ckpt_lib.RunCheckpointer(tmp_path / name, best_metric="val/auc") for name in "ab"]
  prefixes = [manager._options.multiprocessing_options.barrier_sync_key_prefix  # pylint: disable=protected-access
              for run in runs for manager in (run._latest, run._best)]  # pylint: disable=protected-access
  assert all(prefixes) and len(set(prefixes)) == 4, prefixes
  for run in runs:
    run.close()
