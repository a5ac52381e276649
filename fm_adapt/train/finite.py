"""Checks that a train state is finite before anything persists it (checkpoint, best, export).

The loop checks a step's loss and parameter norm (`l2_params`, the norm after the update, i.e.
of the state about to be saved) before it logs, evaluates or saves that step; restored and
exported trees are checked leaf by leaf.
"""
from __future__ import annotations

import math
import pathlib
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from fm_adapt import param_paths
from fm_adapt.train import workdir as workdir_lib


class NonFiniteError(FloatingPointError):
  """A state whose loss or parameters are not finite; it was not persisted."""


def check_measurements(step: int, measurements: Mapping[str, Any], workdir: pathlib.Path,
                       last_checkpoint: Callable[[], pathlib.Path | None]) -> None:
  """Raises `NonFiniteError` unless the step's loss and parameter norm are finite.

  Args:
    step: the step whose update produced `measurements`.
    measurements: the update's `loss` and `l2_params` (device scalars; this waits for them).
    workdir: the run's directory, named in the error.
    last_checkpoint: returns the newest saved checkpoint (finite, as every saved one) or None;
      called only on failure.
  """
  loss, norm = float(measurements["loss"]), float(measurements["l2_params"])
  if math.isfinite(loss) and math.isfinite(norm):
    return
  last = last_checkpoint()
  if last is not None:
    resume = (f"The last finite checkpoint is {last}: running the same command resumes from it "
              "(with the same config a deterministic run meets this step again).")
  else:
    resume = "No checkpoint was saved before it."
  if workdir_lib.has_progress(workdir):
    change = ("use a fresh --workdir (a resume here refuses config changes that alter "
              "training)")
  else:
    change = "run again with the new config (nothing was saved, so this workdir takes it)"
  raise NonFiniteError(
      f"Non-finite training state at step {step} in {workdir}: loss {loss}, parameter norm "
      f"{norm}; it was not saved. {resume} To lower config.lr, add config.grad_clip_norm or "
      f"change the data, {change}; and check the input pipeline for NaNs.")


def non_finite_leaves(tree: Any) -> list[str]:
  """Paths ('a/b/c') of the floating-point leaves of a nested dict that hold NaN or inf."""
  bad = []
  for path, leaf in param_paths.flatten(tree).items():
    if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.inexact):
      if not bool(jax.device_get(jnp.isfinite(leaf).all())):
        bad.append(path)
  return bad


def check_tree(tree: Any, what: str) -> None:
  """Raises `NonFiniteError` naming `what` and the first bad leaves if any leaf is not finite."""
  bad = non_finite_leaves(tree)
  if bad:
    raise NonFiniteError(f"{what} holds non-finite values in {len(bad)} arrays, e.g. {bad[:5]}.")
