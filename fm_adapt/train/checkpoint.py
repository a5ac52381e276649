"""Orbax checkpoints of a run: periodic (keep N) and best-by-metric, strict restore.

Layout in the workdir:
  ckpt/<step>/state                     latest N train states,
  ckpt/<step>/iterator/process_<i>-of-<n>.json   each process's own data-iterator state (grain's
                                        orbax handler: on a pod every process restores its own),
  ckpt/<step>/data                      {'process_count', 'base_checkpoint', ...} (JSON)
  best/<step>/state                     the params / model_state of the best evaluation
  corrupt/ckpt_<step>                   a kept step that could not be read, set aside on resume

A resume takes the newest kept step that reads back and passes the caller's check; newer ones
that do not are named in a warning and moved to `corrupt/` once an older step has restored (a
model that no longer fits is an error, never a reason to move checkpoints). Orbax's answer to
every save is checked: memory and disk never disagree about what was saved. The workdir may be
a `gs://` URI: every path is an `etils.epath.Path`, as orbax's own.
"""
from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from fm_adapt import param_paths
from fm_adapt.train import files
from fm_adapt.train import writer as writer_lib


class IncompatibleCheckpoint(ValueError):
  """A readable checkpoint whose weights do not fit the run's model."""


class CheckpointError(RuntimeError):
  """No kept checkpoint reads back, or orbax refused a save."""


def _metadata_tree(metadata: Any) -> Any:
  return getattr(metadata, "tree", metadata)


WEIGHT_KEYS = ("params", "model_state")


def _weight_shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape for the weight subtrees (plain nested dicts) of a state."""
  weights = {k: tree[k] for k in WEIGHT_KEYS if k in tree and tree[k] is not None}
  return {k: tuple(v.shape) for k, v in param_paths.flatten(weights).items() if hasattr(v, "shape")}


def check_compatible(saved: Mapping[str, Any], target: Mapping[str, Any], where: str) -> None:
  """Raises a clear error when saved and target weights differ in keys or shapes.

  The weight subtrees (params, model_state) are compared path by path; the optimizer state
  follows the params, and orbax checks its shapes on restore.
  """
  saved_flat, target_flat = _weight_shapes(saved), _weight_shapes(target)
  missing = sorted(set(target_flat) - set(saved_flat))
  unexpected = sorted(set(saved_flat) - set(target_flat))
  shapes = sorted(f"{k}: saved {saved_flat[k]} vs model {target_flat[k]}"
                  for k in set(saved_flat) & set(target_flat) if saved_flat[k] != target_flat[k])
  if missing or unexpected or shapes:
    lines = [f"The checkpoint at {where} does not fit this run's model/config."]
    if missing:
      lines.append(f"  missing from the checkpoint ({len(missing)}): {missing[:20]}")
    if unexpected:
      lines.append(f"  in the checkpoint but not the model ({len(unexpected)}): {unexpected[:20]}")
    if shapes:
      lines.append(f"  shape differences ({len(shapes)}): {shapes[:20]}")
    lines.append("  Use a fresh --workdir for a different model, or the config it was saved with.")
    raise IncompatibleCheckpoint("\n".join(lines))


def _barriers(directory: epath.Path) -> ocp.options.MultiprocessingOptions:
  """Orbax's multi-process options with barrier keys of this manager's own.

  Orbax names the barriers of an async save after the step's folder (`20.orbax-checkpoint-tmp`),
  the same in `ckpt/` and `best/` (and in every seed's `best/` of a stacked group). Two managers
  saving one step at once then pass each other's barriers: process 0 finalized `best/20` before
  process 1 had written its part, and both processes failed (seen in the two-process
  pre-emption test). A prefix per manager directory keeps the barriers apart (orbax's
  `barrier_sync_key_prefix`, meant for concurrent managers); every process names the same
  directory, so they agree on it.
  """
  digest = hashlib.sha256(str(directory).encode()).hexdigest()[:16]
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=f"{directory.name}_{digest}")


class RunCheckpointer:
  """Saves and restores a run's train state, data-iterator state and best parameters."""

  def __init__(self, workdir: epath.PathLike, keep: int = 2, best_metric: str | None = None,
               best_mode: str = "max"):
    workdir = files.as_path(workdir)
    self._workdir = workdir
    self._latest = ocp.CheckpointManager(
        workdir / "ckpt",
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "iterator": grain.checkpoint.CheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                             multiprocessing_options=_barriers(workdir / "ckpt")))
    self._best = None
    self.best_metric = best_metric
    self._best_mode = best_mode
    self._best_value: float | None = None
    if best_metric:
      self._best = ocp.CheckpointManager(
          workdir / "best", item_handlers={"state": ocp.StandardCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_mode=best_mode,
              best_fn=lambda metrics: metrics[best_metric],
              multiprocessing_options=_barriers(workdir / "best")))
      self._best_value = self._saved_best_value()

  def _saved_best_value(self) -> float | None:
    """The metric of the saved best (a resumed run's later evaluations must beat it)."""
    step = self._best.best_step()
    if step is None:
      return None
    metrics = self._best.metrics(step) or {}
    if self.best_metric not in metrics:  # Unreadable metadata: the next evaluation replaces it.
      writer_lib.console(f"Warning: the best checkpoint {self._best.directory}/{step} has no "
                         f"readable {self.best_metric}; the next evaluation replaces it.")
      return None
    return float(metrics[self.best_metric])

  @property
  def directory(self) -> epath.Path:
    return epath.Path(self._latest.directory)

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def save(self, step: int, state: Mapping[str, Any], data_state: Mapping[str, Any],
           iterator: Any = None) -> None:
    """Saves (asynchronously) the train state, every process's iterator state and `data_state`.

    Args:
      step: the step of `state`.
      state: the checkpointed train state (`state.checkpointed`).
      data_state: JSON-able facts of the run's data and base (the process count is added).
      iterator: the training data iterator (a grain iterator), saved per process; None for none.
    """
    items = {"state": ocp.args.StandardSave(state),
             "data": ocp.args.JsonSave({**data_state, "process_count": jax.process_count()})}
    if iterator is not None:
      items["iterator"] = grain.checkpoint.CheckpointSave(iterator)
    saved = self._latest.save(step, args=ocp.args.Composite(**items))
    if not saved:
      raise CheckpointError(
          f"orbax did not save step {step} in {self.directory} (it holds steps "
          f"{self._latest.all_steps()}): a workdir is trained by one process at a time.")

  def restore(self, abstract_state: Mapping[str, Any], step: int | None = None,
              iterator: Any = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores the latest (or given) step onto `abstract_state`'s shapes and shardings.

    With `iterator`, this process's own saved iterator state is set on it (a checkpoint of
    the older layout, one state in `data['iterator']`, is read for a one-process run).

    Raises:
      IncompatibleCheckpoint: the weights do not fit, or the step was saved by another number
        of processes than this run has.
    """
    step = self._latest.latest_step() if step is None else step
    where = f"{self._latest.directory}/{step}"
    saved = _metadata_tree(self._latest.item_metadata(step)["state"])
    check_compatible(saved, abstract_state, where)
    data = self._latest.restore(step, args=ocp.args.Composite(data=ocp.args.JsonRestore()))["data"]
    _check_process_count(data, where)
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    per_process = (self.directory / str(step) / "iterator").is_dir()
    if iterator is not None and per_process:
      items["iterator"] = grain.checkpoint.CheckpointRestore(iterator)
    out = self._latest.restore(step, args=ocp.args.Composite(**items))
    if iterator is not None and not per_process:
      if "iterator" not in data:
        raise CheckpointError(f"{where} holds no data-iterator state.")
      iterator.set_state(data["iterator"].encode())
    return out["state"], data

  def restore_latest(self, abstract_state: Mapping[str, Any],
                     check: Callable[[int, Mapping[str, Any], Mapping[str, Any]], None] | None = None,
                     iterator: Any = None) -> tuple[dict[str, Any], dict[str, Any], int] | None:
    """Restores the newest kept step that reads back; None when no step is kept.

    A step that fails (orbax, tensorstore or JSON errors, or `check(step, state, data)` raising)
    is named in a warning and the next older one is tried; once one restores, the failed newer
    steps are moved to `<workdir>/corrupt/`, so training can save those steps again.

    Raises:
      IncompatibleCheckpoint: the checkpoints do not fit the model (nothing is moved).
      CheckpointError: no kept step reads back; the error lists them and what to delete.
    """
    failed: list[tuple[int, str]] = []
    for step in sorted(self._latest.all_steps(), reverse=True):
      try:
        state, data = self.restore(abstract_state, step, iterator)
        if check is not None:
          check(step, state, data)
      except IncompatibleCheckpoint:
        raise
      except Exception as e:  # pylint: disable=broad-except  # Corruption shows as any error.
        reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
        failed.append((step, reason))
        writer_lib.console(f"Warning: checkpoint {self.directory / str(step)} cannot be "
                           f"restored ({reason}); trying the next older kept step.")
        continue
      for bad, _ in failed:
        self._set_aside(bad)
      return state, data, step
    if failed:
      dirs = " ".join(str(self.directory / str(s)) for s, _ in failed)
      raise CheckpointError(
          "No kept checkpoint can be restored:\n" +
          "\n".join(f"  {self.directory / str(s)}: {r}" for s, r in failed) +
          f"\nTo train this workdir again from scratch, delete them (rm -r {dirs}), or use a "
          "fresh --workdir.")
    return None

  def _set_aside(self, step: int) -> None:
    """Moves an unreadable step directory to `<workdir>/corrupt/ckpt_<step>[_n]`."""
    target = self._workdir / "corrupt" / f"ckpt_{step}"
    n = 1
    while target.exists():
      target, n = self._workdir / "corrupt" / f"ckpt_{step}_{n}", n + 1
    if jax.process_index() == 0:
      target.parent.mkdir(parents=True, exist_ok=True)
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:  # Every process sees the move before it lists the steps again.
      multihost_utils.sync_global_devices(f"fm_adapt: set aside checkpoint {step}")
    self._latest.reload()
    writer_lib.console(f"Warning: moved the unreadable checkpoint of step {step} to {target}; "
                       "delete it once you have looked at it.")

  def _improves(self, value: float | None) -> bool:
    if value is None or value != value:  # An undefined or NaN metric never improves.
      return False
    if self._best_value is None:
      return True
    return value > self._best_value if self._best_mode == "max" else value < self._best_value

  def save_best(self, step: int, weights: Mapping[str, Any], metrics: Mapping[str, float]) -> bool:
    """Saves the weights of an evaluation if `best_metric` strictly beats the best so far.

    Only improvements are written (orbax would write every evaluation and then delete the
    worse ones: on a CPU that costs more than the evaluation itself). A saved best at a step
    >= `step` (saved before a resume re-ran its steps) is replaced, since orbax saves no step
    below its latest one; the best value in memory changes only once orbax has saved.

    Returns:
      Whether the weights were saved.
    """
    if self._best is None:
      return False
    value = metrics[self.best_metric]
    value = None if value is None else float(value)
    if not self._improves(value):
      return False
    self._best.wait_until_finished()
    for stale in [s for s in self._best.all_steps() if s >= step]:
      self._best.delete(stale)
    saved = self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(weights)),
                            metrics={k: float(v) for k, v in metrics.items() if v is not None})
    if not saved:
      raise CheckpointError(f"orbax did not save the best checkpoint of step {step} in "
                            f"{self._best.directory} (it holds {self._best.all_steps()}).")
    self._best_value = value
    return True

  def best_step(self) -> int | None:
    if self._best is None:
      return None
    self._best.wait_until_finished()
    return self._best.best_step()

  def restore_best(self, abstract_weights: Mapping[str, Any]) -> dict[str, Any]:
    """Restores the best-by-metric weights onto `abstract_weights`."""
    step = self.best_step()
    if step is None:
      raise FileNotFoundError("No best checkpoint was saved (no evaluation has run).")
    where = f"{self._best.directory}/{step}"
    saved = _metadata_tree(self._best.item_metadata(step)["state"])
    check_compatible(saved, abstract_weights, where)
    try:
      out = self._best.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_weights)))
    except Exception as e:  # pylint: disable=broad-except  # Corruption shows as any error.
      raise CheckpointError(
          f"The best checkpoint {where} cannot be restored ({type(e).__name__}: "
          f"{str(e).splitlines()[0][:300] if str(e) else ''}). Delete it (rm -r {where}) and "
          "run the same command: the final state is then evaluated instead.") from e
    return out["state"]

  def wait(self) -> None:
    self._latest.wait_until_finished()
    if self._best is not None:
      self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    if self._best is not None:
      self._best.close()


def _check_process_count(data: Mapping[str, Any], where: str) -> None:
  """Each process restores the iterator state it saved: the process count must not change."""
  saved = int(data.get("process_count", 1))
  if saved != jax.process_count():
    raise IncompatibleCheckpoint(
        f"The checkpoint {where} was saved by {saved} process(es) and this run has "
        f"{jax.process_count()}: each process resumes its own data-iterator state. Resume with "
        f"{saved} process(es), or start a fresh --workdir.")


def abstract_of(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, for restoring onto it."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
