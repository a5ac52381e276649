"""A study's plan before it trains (`--dry_run`): its runs, their steps, and the time they take.

The time of a run is its steps times the median time of one training step, measured here: for
each distinct training program of the study (model, adaptation, schedule, pp, batch: what a step
computes) one run is built, its step compiled, and three steps timed. Evaluation and
compilation are not in the estimate, and a loaded machine measures slow steps: the plan says so.
"""
from __future__ import annotations

import json
import re
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from fm_adapt.train import build, mesh as mesh_lib, step as step_lib

# The config keys that decide what one training step computes (and so its time).
PROGRAM_KEYS = ("model_name", "model", "adapt", "schedule", "frozen_statistics", "dtype", "remat",
                "grad_accum_steps", "loss", "mesh")
INPUT_KEYS = ("pp", "batch_size")


def program_key(config: ml_collections.ConfigDict) -> str:
  """A key equal for two configs whose training steps compute the same thing."""
  def plain(value: Any) -> Any:
    return value.to_dict() if hasattr(value, "to_dict") else value
  key = {k: plain(config.get(k)) for k in PROGRAM_KEYS}
  key.update({f"input.{k}": plain(config.input.get(k)) for k in INPUT_KEYS})
  return json.dumps(key, sort_keys=True, default=str)


def _buildable(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """`config` without a `run:` model_init: the run it names may not exist yet, and a step of
  the model takes the same time whatever its initial weights."""
  if not str(config.get("model_init") or "").startswith("run:"):
    return config
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.model_init = None
  return config


def measure_step(config: ml_collections.ConfigDict, data_dir: str | None, steps: int = 3
                 ) -> tuple[float, int]:
  """Builds the run of `config`; returns (median seconds of one step after compiling, the run's
  total steps)."""
  run = build.build_run(_buildable(config), data_dir or config.get("data_dir"))
  state = run.init_state()
  update = step_lib.jit_update(run.update_fn, state, run.mesh)
  batches = iter(run.train_loader)
  times = []
  for index in range(steps + 1):  # The first call compiles.
    batch = mesh_lib.global_batch(next(batches), run.mesh)
    start = time.perf_counter()
    state, measurements = update(state, run.rng, batch)
    jax.block_until_ready(measurements)
    if index:
      times.append(time.perf_counter() - start)
  return statistics.median(times), run.total_steps


def _length_key(config: ml_collections.ConfigDict) -> str:
  """A key equal for two configs whose runs have the same number of steps."""
  return json.dumps([config.input.data.to_dict(), config.input.get("label_fraction"),
                     config.input.batch_size, config.input.get("last_batch"),
                     config.get("total_epochs"), config.get("total_steps")], default=str)


def _duration(seconds: float) -> str:
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 5400:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


def plan(runs: Sequence[Any], configs: Sequence[ml_collections.ConfigDict],
         done: Sequence[bool], data_dir: str | None) -> str:
  """The markdown plan of a study: one row per run (steps, measured step, estimated time).

  Args:
    runs: the study's `RunSpec`s, in order.
    configs: each run's config (a `run:` model_init left unresolved is fine: it is not loaded).
    done: whether each run has finished (its time is not counted).
    data_dir: the data directory.
  """
  measured: dict[str, float] = {}
  steps_of: dict[str, int] = {}
  lines = ["| run | seed | steps | step (s) | estimate |", "|---|---|---|---|---|"]
  total = 0.0
  for run, config, finished in zip(runs, configs, done):
    key = program_key(config)
    if key not in measured:
      measured[key], steps_of[_length_key(config)] = measure_step(config, data_dir)
    step_s = measured[key]
    steps = config.get("total_steps") or steps_of.get(_length_key(config))
    if steps is None:  # An epoch-long run whose data was not built yet: its length needs it.
      steps = steps_of[_length_key(config)] = build.build_run(
          _buildable(config), data_dir or config.get("data_dir")).total_steps
    estimate = step_s * steps
    total += 0.0 if finished else estimate
    lines.append(f"| {run.dirname} | {run.seed} | {steps} | {step_s:.3f} | "
                 f"{'done' if finished else _duration(estimate)} |")
  load = ", ".join(f"{x:.1f}" for x in _load_average())
  lines += ["", f"{len(runs)} runs ({sum(done)} done), {len(measured)} distinct training "
            f"programs measured; training time left: about {_duration(total)} (steps only: "
            f"evaluation and compilation not counted; load average {load} while measuring)."]
  return "\n".join(lines)


def _load_average() -> tuple[float, ...]:
  try:
    with open("/proc/loadavg") as f:
      return tuple(float(x) for x in f.read().split()[:3])
  except OSError:
    return ()


def select(runs: Sequence[Any], pattern: str | None) -> list[Any]:
  """The runs whose directory name (`<name>-s<seed>`) matches the regex `pattern` (re.search);
  all runs for None. A pattern matching no run is an error listing the names."""
  if pattern is None:
    return list(runs)
  try:
    compiled = re.compile(pattern)
  except re.error as error:
    raise ValueError(f"--only={pattern!r} is not a regular expression: {error}.") from None
  chosen = [r for r in runs if compiled.search(r.dirname)]
  if not chosen:
    names = sorted({r.name for r in runs})
    raise ValueError(f"--only={pattern!r} matches no run of the study; its runs are "
                     f"{names[:20]}{' ...' if len(names) > 20 else ''} (with -s<seed>).")
  return chosen
