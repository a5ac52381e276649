"""Run a study: expand an experiment's `sweep`, train each run in its own workdir, tabulate.

  python -m fm_adapt.study --config experiments/peft_quick.py:runlocal --workdir workdirs/peft \
      [--config.total_steps=100] [--allow_harmless_changes]

The experiment exports `get_config(arg)` and `sweep(add, arg)`; `sweep` calls
`add(name=..., seed=..., **overrides)` once per run, where overrides are config keys, dotted for
nested ones (`**{'model.variant': 'S/16'}`). Runs are trained in the order added, each in
`<workdir>/<name>-s<seed>`; finished runs (with a results.json) are skipped, an interrupted one
resumes. `model_init='run:<name>'` starts a run from the exported weights of an earlier run of
the study. Results are aggregated over seeds into `<workdir>/results.{md,csv,tex}`: per run name,
the label fraction, parameter counts, metrics and costs (step time, wall time, peak memory; mean
+- std over seeds), and `step_time_ratio`, the step time over that of the reference run: the
experiment's `REFERENCE = '<run name>'` (a module attribute), else its full fine-tuning run (no
`config.adapt`, no frozen schedule rule; the first of several); without one the column is left
out, with a line that says so.

`--config.key=value` overrides (as in `fm_adapt.main`) apply to every run, after the sweep's
own; a key the sweep also sets is an error. Each run's workdir is locked while the study checks
or trains it, and a finished run is skipped only if its config.json holds the run's config
(`fm_adapt.train.workdir.check_config`). The workdir may be a `gs://` URI (`etils.epath`).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import pathlib
import re
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from fm_adapt import process_flags
from fm_adapt.report import tables
from fm_adapt.train import files, interrupt, loop
from fm_adapt.train import workdir as workdir_lib, writer as writer_lib

METRICS = tables.STUDY_METRICS
# The columns of the study's table; step_time_ratio only where there is a reference run.
COLUMNS = ("run", "seeds", "label_fraction", "trainable_params", "total_params", *METRICS,
           "step_time_ms", "step_time_ratio", "wall_time_s", "peak_memory_mib",
           "peak_memory_source", "data")
_EXTRA = ("label_fraction", "trainable_params", "total_params", "peak_memory_source", "data")


@dataclasses.dataclass
class RunSpec:
  """One run of a study: its name (group), seed and config overrides."""
  name: str
  seed: int
  overrides: dict[str, Any]

  @property
  def dirname(self) -> str:
    return f"{self.name}-s{self.seed}"


def load_experiment(spec: str) -> tuple[Any, str | None]:
  """Imports an experiment file given as 'path/to/file.py[:arg]'."""
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise FileNotFoundError(f"No experiment file {path!r}.")
  module_spec = importlib.util.spec_from_file_location(f"experiment_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ValueError(f"{path} has no get_config(arg).")
  return module, (arg or None)


def expand(module: Any, arg: str | None) -> list[RunSpec]:
  """The runs of an experiment's sweep (one run of the plain config without a sweep)."""
  runs: list[RunSpec] = []

  def add(name: str | None = None, seed: int = 0, **overrides: Any) -> None:
    name = name or ",".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "default"
    name = re.sub(r"[^A-Za-z0-9_.=,+-]", "_", name)
    if any(r.name == name and r.seed == seed for r in runs):
      raise ValueError(f"sweep added run {name!r} seed {seed} twice.")
    runs.append(RunSpec(name, seed, overrides))

  if hasattr(module, "sweep"):
    module.sweep(add, arg)
  else:
    add()
  if not runs:
    raise ValueError("The sweep added no run.")
  return runs


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any]) -> None:
  """Sets dotted keys on a config; a missing intermediate key is an error naming it."""
  for key, value in overrides.items():
    *parents, leaf = key.split(".")
    node = config
    for part in parents:
      if part not in node:
        raise KeyError(f"Override {key!r}: config has no {part!r}; keys: {sorted(node.keys())}")
      node = node[part]
    with node.unlocked():
      if leaf in node and node[leaf] is not None:
        del node[leaf]  # An override may change a value's type (a dict -> a list of rules).
      node[leaf] = value


def _check_no_conflict(run: RunSpec, overrides: Mapping[str, Any]) -> None:
  """A command-line override may not set a key the sweep sets for a run (or its parent/child)."""
  swept = ["seed", *run.overrides]
  for key in overrides:
    clash = [k for k in swept if k == key or k.startswith(key + ".") or key.startswith(k + ".")]
    if clash:
      raise ValueError(f"--config.{key} overrides {clash} that the sweep sets for run "
                       f"{run.dirname}: remove the override, or change the sweep.")


def run_config(module: Any, arg: str | None, run: RunSpec, workdir: epath.PathLike,
               overrides: Mapping[str, Any] | None = None) -> ml_collections.ConfigDict:
  """The config of one run: get_config(arg), the seed, the sweep's overrides, the command line's
  `overrides` (dotted keys), then `run:` references."""
  overrides = dict(overrides or {})
  _check_no_conflict(run, overrides)
  config = module.get_config(arg)
  apply_overrides(config, {"seed": run.seed, **run.overrides})
  apply_overrides(config, overrides)
  init = config.get("model_init")
  if isinstance(init, str) and init.startswith("run:"):
    ref = init[len("run:"):]
    matches = sorted(files.as_path(workdir).glob(f"{ref}-s*/export/model.npz"))
    if not matches:
      raise FileNotFoundError(f"model_init={init!r}: run {ref!r} has no export yet; add it to "
                              "the sweep before the runs that start from it.")
    config.model_init = str(matches[0])
  return config


def run_study(spec: str, workdir: epath.PathLike, data_dir: str | None = None,
              train: Callable[..., dict] = loop.train_and_evaluate,
              overrides: Mapping[str, Any] | None = None,
              allow_harmless_changes: bool = False) -> str:
  """Trains every run of a study that has not finished, then writes and returns the table.

  Args:
    spec: 'path/to/experiment.py[:arg]'.
    workdir: the study's directory (a local path or a `gs://` URI); run `<name>-s<seed>` trains
      in `<workdir>/<name>-s<seed>`.
    data_dir: data directory (else the config's, FM_ADAPT_DATA_DIR, the cache dir).
    train: `train(config, run_workdir, data_dir, allow_harmless_changes) -> results`.
    overrides: dotted config keys set on every run (`--config.key=value`).
    allow_harmless_changes: on resume, accept changes of `workdir.HARMLESS_KEYS`.
  """
  module, arg = load_experiment(spec)
  workdir = files.as_path(workdir)
  workdir_lib.check_storage(workdir)
  runs = expand(module, arg)
  for run in runs:
    _check_no_conflict(run, overrides or {})
  _check_reference(module, runs)
  first = loop.start_processes()
  results: dict[str, list[dict]] = {}
  configs: dict[str, ml_collections.ConfigDict] = {}
  for index, run in enumerate(runs):
    run_dir = workdir / run.dirname
    done = run_dir / "results.json"
    with workdir_lib.lock(run_dir, owner=first):
      config = run_config(module, arg, run, workdir, overrides)
      configs.setdefault(run.name, config)
      if done.exists():
        workdir_lib.check_config(run_dir, config, allow_harmless_changes, write=False)
        writer_lib.console(f"[{index + 1}/{len(runs)}] {run.dirname}: done, skipped")
        result = json.loads(done.read_text())
      else:
        writer_lib.console(f"[{index + 1}/{len(runs)}] {run.dirname}: training")
        result = train(config, run_dir, data_dir, allow_harmless_changes)
    results.setdefault(run.name, []).append(_flat_result(result))
  rows = tables.aggregate(results, [*METRICS, *tables.STUDY_COSTS], extra=_EXTRA)
  reference = reference_run(module, configs)
  columns = [c for c in COLUMNS if c != "step_time_ratio" or reference is not None]
  if reference is not None:
    rows = tables.ratio_to(rows, "step_time_ms", reference, "step_time_ratio")
  markdown = tables.write_tables(workdir, rows, columns)
  return markdown


def _check_reference(module: Any, runs: list[RunSpec]) -> None:
  """The experiment's `REFERENCE`, where it has one, must name a run of its sweep."""
  if hasattr(module, "REFERENCE"):
    names = list(dict.fromkeys(r.name for r in runs))
    if module.REFERENCE not in names:
      raise ValueError(f"REFERENCE = {module.REFERENCE!r} in the experiment names no run of its "
                       f"sweep; set it to one of {names}.")


def is_full_finetuning(config: ml_collections.ConfigDict) -> bool:
  """No adaptation transform and no frozen schedule rule: every parameter is trained."""
  schedule = config.get("schedule")
  rules = schedule if isinstance(schedule, (list, tuple)) else ()
  return not config.get("adapt") and not any(rule[1] is None for rule in rules)


def reference_run(module: Any, configs: Mapping[str, ml_collections.ConfigDict]) -> str | None:
  """The run name step times are compared with (module docstring); None, said, if none."""
  if hasattr(module, "REFERENCE"):
    return module.REFERENCE
  full = [name for name, config in configs.items() if is_full_finetuning(config)]
  if not full:
    writer_lib.console("No step_time_ratio column: no run of the study trains every parameter "
                       "(no config.adapt, no frozen schedule rule); set REFERENCE = '<run "
                       "name>' in the experiment to compare step times with one.")
    return None
  if len(full) > 1:
    writer_lib.console(f"step_time_ratio is relative to {full[0]!r}, the first of the full "
                       f"fine-tuning runs {full}; set REFERENCE = '<run name>' in the experiment "
                       "to choose another.")
  return full[0]


def _flat_result(result: Mapping[str, Any]) -> dict[str, Any]:
  """One run's table entries: metrics, parameter counts, costs in the table's units (a peak that
  may be an earlier run's, `peak_memory_upper_bound`, is left out), the data variant."""
  data = result.get("data") or {}
  variant = data.get("variant", data.get("name", "")) if isinstance(data, Mapping) else str(data)
  step, peak = result.get("step_time_s"), result.get("peak_memory_bytes")
  if result.get("peak_memory_upper_bound"):
    peak = None
  return {**result["metrics"], "trainable_params": result.get("trainable_params"),
          "total_params": result.get("total_params"),
          "label_fraction": result.get("label_fraction", 1.0),  # Results before it: all.
          "step_time_ms": None if step is None else 1e3 * step,
          "wall_time_s": result.get("wall_time_s"),
          "peak_memory_mib": None if peak is None else peak / 2**20,
          "peak_memory_source": result.get("peak_memory_source"), "data": variant}


_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment file and argument: file.py[:arg]; --config.key=value overrides "
    "apply to every run.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the study.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory.")
_ALLOW_HARMLESS = flags.DEFINE_bool(
    "allow_harmless_changes", False,
    "On resume, accept config changes of " + ", ".join(workdir_lib.HARMLESS_KEYS) + ".")


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config_flag = flags.FLAGS["config"]
  try:
    process_flags.start_from_flags()
    table = run_study(config_flags.get_config_filename(config_flag), _WORKDIR.value,
                      _DATA_DIR.value, overrides=config_flags.get_override_values(config_flag),
                      allow_harmless_changes=_ALLOW_HARMLESS.value)
  except KeyboardInterrupt as error:  # Finished runs are skipped and the stopped one resumes.
    interrupt.exit_with_resume_hint(error, _WORKDIR.value)
  except loop.REFUSALS as error:
    interrupt.exit_with_error(error)
  print(table, flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
