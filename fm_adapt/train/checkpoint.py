"""Orbax checkpoints of a run: periodic (keep N) and best-by-metric, strict restore.

Layout in the workdir:
  ckpt/<step>/state, ckpt/<step>/data   latest N train states + the data iterator state
  best/<step>/state                     the params / model_state of the best evaluation
"""
from __future__ import annotations

import pathlib
from collections.abc import Mapping
from typing import Any

import jax
import orbax.checkpoint as ocp

from fm_adapt.adapt import masks


def _metadata_tree(metadata: Any) -> Any:
  return getattr(metadata, "tree", metadata)


WEIGHT_KEYS = ("params", "model_state")


def _weight_shapes(tree: Mapping[str, Any]) -> dict[str, tuple[int, ...]]:
  """'/'-joined path -> shape for the weight subtrees (plain nested dicts) of a state."""
  weights = {k: tree[k] for k in WEIGHT_KEYS if k in tree and tree[k] is not None}
  return {k: tuple(v.shape) for k, v in masks.flatten(weights).items() if hasattr(v, "shape")}


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
    raise ValueError("\n".join(lines))


class RunCheckpointer:
  """Saves and restores a run's train state, data-iterator state and best parameters."""

  def __init__(self, workdir: str | pathlib.Path, keep: int = 2, best_metric: str | None = None,
               best_mode: str = "max"):
    workdir = pathlib.Path(workdir).absolute()
    self._latest = ocp.CheckpointManager(
        workdir / "ckpt",
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "data": ocp.JsonCheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))
    self._best = None
    self.best_metric = best_metric
    self._best_mode = best_mode
    self._best_value: float | None = None
    if best_metric:
      self._best = ocp.CheckpointManager(
          workdir / "best", item_handlers={"state": ocp.StandardCheckpointHandler()},
          options=ocp.CheckpointManagerOptions(
              max_to_keep=1, create=True, best_mode=best_mode,
              best_fn=lambda metrics: metrics[best_metric]))
      step = self._best.best_step()
      if step is not None:  # A resumed run: later evaluations must beat the saved best.
        self._best_value = float(self._best.metrics(step)[best_metric])

  @property
  def directory(self) -> pathlib.Path:
    return pathlib.Path(self._latest.directory)

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def save(self, step: int, state: Mapping[str, Any], data_state: Mapping[str, Any]) -> None:
    """Saves (asynchronously) the full train state and the data-iterator state."""
    self._latest.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(dict(data_state))))

  def restore(self, abstract_state: Mapping[str, Any], step: int | None = None
              ) -> tuple[dict[str, Any], dict[str, Any]]:
    """Restores the latest (or given) step onto `abstract_state`'s shapes and shardings."""
    step = self._latest.latest_step() if step is None else step
    saved = _metadata_tree(self._latest.item_metadata(step)["state"])
    check_compatible(saved, abstract_state, f"{self._latest.directory}/{step}")
    out = self._latest.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
    return out["state"], out["data"]

  def _improves(self, value: float) -> bool:
    if value != value:  # NaN never improves.
      return False
    if self._best_value is None:
      return True
    return value > self._best_value if self._best_mode == "max" else value < self._best_value

  def save_best(self, step: int, weights: Mapping[str, Any], metrics: Mapping[str, float]) -> bool:
    """Saves the weights of an evaluation if `best_metric` strictly beats the best so far.

    Only improvements are written (orbax would write every evaluation and then delete the
    worse ones: on a CPU that costs more than the evaluation itself).

    Returns:
      Whether the weights were saved.
    """
    if self._best is None:
      return False
    value = float(metrics[self.best_metric])
    if not self._improves(value):
      return False
    self._best.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(weights)),
                    metrics={k: float(v) for k, v in metrics.items()})
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
    saved = _metadata_tree(self._best.item_metadata(step)["state"])
    check_compatible(saved, abstract_weights, f"{self._best.directory}/{step}")
    out = self._best.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_weights)))
    return out["state"]

  def wait(self) -> None:
    self._latest.wait_until_finished()
    if self._best is not None:
      self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    if self._best is not None:
      self._best.close()


def abstract_of(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a tree of arrays, for restoring onto it."""
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)
