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
import traceback
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import ml_collections
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from fm_adapt import process_flags, study_plan
from fm_adapt.report import study_index
from fm_adapt.report import tables
from fm_adapt.train import files, interrupt, loop, stacked_loop
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
               overrides: Mapping[str, Any] | None = None, resolve_runs: bool = True
               ) -> ml_collections.ConfigDict:
  """The config of one run: get_config(arg), the seed, the sweep's overrides, the command line's
  `overrides` (dotted keys), then `run:` references (left as they are with `resolve_runs=False`,
  for a plan made before those runs exist)."""
  overrides = dict(overrides or {})
  _check_no_conflict(run, overrides)
  config = module.get_config(arg)
  apply_overrides(config, {"seed": run.seed, **run.overrides})
  apply_overrides(config, overrides)
  init = config.get("model_init")
  if isinstance(init, str) and init.startswith("run:"):
    if not resolve_runs:
      return config
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
              allow_harmless_changes: bool = False, only: str | None = None,
              dry_run: bool = False, stack_seeds: bool = False) -> str:
  """Trains every run of a study that has not finished, then writes and returns the table.

  A run that fails is recorded in `<run dir>/failure.json` (error and traceback) and the others
  go on; the table holds the finished runs, `index.md` names the failed ones, and `StudyFailed`
  is raised at the end. Rerunning the study retries them.

  Args:
    spec: 'path/to/experiment.py[:arg]'.
    workdir: the study's directory (a local path or a `gs://` URI); run `<name>-s<seed>` trains
      in `<workdir>/<name>-s<seed>`.
    data_dir: data directory (else the config's, FM_ADAPT_DATA_DIR, the cache dir).
    train: `train(config, run_workdir, data_dir, allow_harmless_changes) -> results`.
    overrides: dotted config keys set on every run (`--config.key=value`).
    allow_harmless_changes: on resume, accept changes of `workdir.HARMLESS_KEYS`.
    only: a regex; only the runs whose `<name>-s<seed>` it matches (re.search) train and are
      tabulated. A regex matching no run is an error listing the runs.
    dry_run: print the plan (runs, steps, a measured step, estimated time) and train nothing.
    stack_seeds: train the unfinished seeds of each run name as one program (the state stacked
      on a leading axis, the update vmapped: `stacked_loop.train_and_evaluate_stacked`), each
      seed's results as if run alone; a group that cannot stack (`StackError`) trains run by
      run, saying why.

  Raises:
    StudyFailed: after the table is written, when some runs failed.
  """
  module, arg = load_experiment(spec)
  workdir = files.as_path(workdir)
  workdir_lib.check_storage(workdir)
  runs = study_plan.select(expand(module, arg), only)
  for run in runs:
    _check_no_conflict(run, overrides or {})
  _check_reference(module, runs)
  configs = [run_config(module, arg, run, workdir, overrides, resolve_runs=False) for run in runs]
  _check_run_references(runs, configs, workdir)
  first = loop.start_processes()
  if dry_run:
    done = [(workdir / run.dirname / "results.json").exists() for run in runs]
    return study_plan.plan(runs, configs, done, data_dir)
  del configs
  results: dict[str, list[dict]] = {}
  full_results: dict[str, list[dict]] = {}
  configs: dict[str, ml_collections.ConfigDict] = {}
  failed: dict[str, str] = {}
  stacked_results: dict[str, dict] = {}
  for index, run in enumerate(runs):
    run_dir = workdir / run.dirname
    done = run_dir / "results.json"
    if run.dirname in failed:
      continue  # Its seed group failed: recorded with the group.
    if stack_seeds and run.dirname not in stacked_results and not done.exists():
      stacked_results.update(_train_stacked_group(
          module, arg, runs, run, workdir, overrides, data_dir, allow_harmless_changes, failed,
          first))
      if run.dirname in failed:
        continue
    try:
      with workdir_lib.lock(run_dir, owner=first):
        config = run_config(module, arg, run, workdir, overrides)
        configs.setdefault(run.name, config)
        if run.dirname in stacked_results:
          result = stacked_results[run.dirname]
        elif done.exists():
          workdir_lib.check_config(run_dir, config, allow_harmless_changes, write=False)
          writer_lib.console(f"[{index + 1}/{len(runs)}] {run.dirname}: done, skipped")
          result = json.loads(done.read_text())
        else:
          writer_lib.console(f"[{index + 1}/{len(runs)}] {run.dirname}: training")
          result = train(config, run_dir, data_dir, allow_harmless_changes)
    except Exception as error:  # pylint: disable=broad-except  (KeyboardInterrupt stops all)
      failed[run.dirname] = _record_failure(run_dir, error, first)
      writer_lib.console(f"[{index + 1}/{len(runs)}] {run.dirname}: FAILED ({failed[run.dirname]})"
                         "; the study goes on.")
      continue
    results.setdefault(run.name, []).append(_flat_result(result))
    full_results.setdefault(run.name, []).append(dict(result))
  markdown = _write_study(module, workdir, results, full_results, configs, failed, first)
  if failed:
    lines = "".join(f"\n  {name}: {error}" for name, error in sorted(failed.items()))
    raise StudyFailed(f"{len(failed)} of {len(runs)} runs failed (each has failure.json in its "
                      f"directory under {workdir}; the table holds the others; run the study "
                      f"again to retry them):{lines}", markdown)
  return markdown


def _check_run_references(runs: Sequence[RunSpec], configs: Sequence[ml_collections.ConfigDict],
                          workdir: epath.Path) -> None:
  """Each `model_init='run:<name>'` names a run earlier in the sweep, or one exported already."""
  for index, (run, config) in enumerate(zip(runs, configs)):
    init = config.get("model_init")
    if not (isinstance(init, str) and init.startswith("run:")):
      continue
    ref = init[len("run:"):]
    earlier = {r.name for r in runs[:index]}
    if ref not in earlier and not list(workdir.glob(f"{ref}-s*/export/model.npz")):
      raise FileNotFoundError(f"Run {run.dirname}: model_init={init!r}, but run {ref!r} has no "
                              "export yet and is not earlier in the sweep; add it to the sweep "
                              "before the runs that start from it.")


def _train_stacked_group(module: Any, arg: str | None, runs: Sequence[RunSpec], run: RunSpec,
                         workdir: epath.Path, overrides: Mapping[str, Any] | None,
                         data_dir: str | None, allow_harmless_changes: bool,
                         failed: dict[str, str], first: bool) -> dict[str, dict]:
  """Trains the unfinished seeds of `run.name` as one program; {dirname: results}. A group that
  cannot stack returns {} (its runs train one by one); a group that fails is recorded in
  `failed` and in every seed's failure.json."""
  group = [r for r in runs if r.name == run.name
           and not (workdir / r.dirname / "results.json").exists()
           and not stacked_loop.trained_alone(workdir / r.dirname)]
  if len(group) < 2:
    return {}
  dirs = [workdir / r.dirname for r in group]
  try:
    configs = [run_config(module, arg, r, workdir, overrides) for r in group]
    stacked_loop.check_stackable(configs, dirs)
  except stacked_loop.StackError as error:
    writer_lib.console(f"{run.name}: the seeds train one by one ({error})")
    return {}
  names = ", ".join(r.dirname for r in group)
  writer_lib.console(f"{names}: training as one program ({len(group)} seeds stacked)")
  try:
    results = stacked_loop.train_and_evaluate_stacked(configs, dirs, data_dir,
                                                      allow_harmless_changes)
  except Exception as error:  # pylint: disable=broad-except  (KeyboardInterrupt stops all)
    for r, run_dir in zip(group, dirs):
      failed[r.dirname] = _record_failure(run_dir, error, first)
    writer_lib.console(f"{names}: FAILED ({failed[group[0].dirname]}); the study goes on.")
    return {}
  return {r.dirname: result for r, result in zip(group, results)}


class StudyFailed(RuntimeError):
  """Some runs of a study failed (the others trained and were tabulated in `table`)."""

  def __init__(self, message: str, table: str):
    super().__init__(message)
    self.table = table


def _record_failure(run_dir: epath.Path, error: Exception, first: bool) -> str:
  """Writes `<run_dir>/failure.json`; returns a one-line summary of the error."""
  summary = f"{type(error).__name__}: {' '.join(str(error).split())}"
  summary = summary if len(summary) <= 500 else summary[:497] + "..."
  if first:
    run_dir.mkdir(parents=True, exist_ok=True)
    files.write_json(run_dir / "failure.json", {
        "error": type(error).__name__, "message": str(error),
        "traceback": "".join(traceback.format_exception(error))})
  return summary


def _write_study(module: Any, workdir: epath.Path, results: Mapping[str, list[dict]],
                 full_results: Mapping[str, list[dict]],
                 configs: Mapping[str, ml_collections.ConfigDict], failed: Mapping[str, str],
                 first: bool) -> str:
  """Writes the tables, the experiment's own report (`report(rows, results)`) and `index.md`."""
  metrics = tuple(getattr(module, "METRICS", METRICS))
  rows = tables.aggregate(results, [*metrics, *tables.STUDY_COSTS], extra=_EXTRA)
  reference = reference_run(module, configs) if results else None
  columns = [c for c in _columns(metrics) if c != "step_time_ratio" or reference is not None]
  if reference is not None:
    rows = tables.ratio_to(rows, "step_time_ms", reference, "step_time_ratio")
  if not first:
    return tables.to_markdown(rows, columns)
  markdown = tables.write_tables(workdir, rows, columns)
  extra = module.report(rows, full_results) if hasattr(module, "report") and rows else {}
  for name, content in extra.items():
    path = workdir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(content, bytes) else path.write_text)(content)
  (workdir / "index.md").write_text(study_index.index(workdir, sorted(results), extra, failed))
  return markdown


def _columns(metrics: Sequence[str]) -> list[str]:
  """The table's columns with the experiment's metric columns in place of the default ones."""
  out = []
  for column in COLUMNS:
    if column == METRICS[0]:
      out += list(metrics)
    elif column not in METRICS:
      out.append(column)
  return out


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
  """The run name step times are compared with (module docstring); None, said, if none.

  An experiment whose rows need different references (full fine-tuning of the same dataset and
  backbone) defines `reference_of(run_name) -> run name | None` instead of `REFERENCE`: the
  result is then a function; a row whose reference did not run has no ratio, said.
  """
  if hasattr(module, "reference_of"):
    return _reference_function(module.reference_of, configs)
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


def _reference_function(reference_of: Callable[[str], str | None],
                        configs: Mapping[str, ml_collections.ConfigDict]
                        ) -> Callable[[str], str | None]:
  missing = sorted({ref for name in configs if (ref := reference_of(name)) is not None
                    and ref not in configs})
  if missing:
    writer_lib.console(f"No step_time_ratio for the runs compared with {missing}: those "
                       "reference runs are not part of this study's results.")
  return lambda name: ref if (ref := reference_of(name)) in configs else None


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


def _define_flags() -> dict[str, flags.FlagHolder]:
  """The command line's flags, defined only when this module runs as the program.

  Experiment files import `fm_adapt.study` (`load_experiment`); under `python -m fm_adapt.study`
  that is a second module object beside `__main__`, and under `python -m fm_adapt.main` the
  program owns `--config` and `--workdir`. Flags defined at import time clashed in both
  ("The flag 'config' is defined twice").
  """
  return {
      "config": config_flags.DEFINE_config_file(
          "config", None, "Experiment file and argument: file.py[:arg]; --config.key=value "
          "overrides apply to every run.", lock_config=True),
      "workdir": flags.DEFINE_string("workdir", None, "Directory of the study."),
      "data_dir": flags.DEFINE_string("data_dir", None, "Data directory."),
      "only": flags.DEFINE_string(
          "only", None, "Regex: train and tabulate only the runs whose <name>-s<seed> it "
          "matches."),
      "dry_run": flags.DEFINE_bool(
          "dry_run", False, "Print the plan (runs, steps, a measured step, estimated time); "
          "train nothing."),
      "stack_seeds": flags.DEFINE_bool(
          "stack_seeds", False, "Train the seeds of each run name as one jitted program "
          "(vmapped update, one checkpoint), each seed's results as if run alone."),
      "allow_harmless_changes": flags.DEFINE_bool(
          "allow_harmless_changes", False,
          "On resume, accept config changes of " + ", ".join(workdir_lib.HARMLESS_KEYS) + "."),
  }


def main(argv, flag: Mapping[str, flags.FlagHolder]) -> None:
  """Runs the study the flags name (`_define_flags`) and prints its table."""
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  config_flag = flags.FLAGS["config"]
  try:
    process_flags.start_from_flags()
    table = run_study(config_flags.get_config_filename(config_flag), flag["workdir"].value,
                      flag["data_dir"].value,
                      overrides=config_flags.get_override_values(config_flag),
                      allow_harmless_changes=flag["allow_harmless_changes"].value,
                      only=flag["only"].value, dry_run=flag["dry_run"].value,
                      stack_seeds=flag["stack_seeds"].value)
  except StudyFailed as error:
    print(error.table, flush=True)
    interrupt.exit_with_error(error)
  except KeyboardInterrupt as error:  # Finished runs are skipped and the stopped one resumes.
    interrupt.exit_with_resume_hint(error, flag["workdir"].value)
  except loop.REFUSALS as error:
    interrupt.exit_with_error(error)
  print(table, flush=True)


if __name__ == "__main__":
  _FLAGS = _define_flags()
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(lambda argv: main(argv, _FLAGS))
