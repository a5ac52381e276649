"""Run a study: expand an experiment's `sweep`, train each run in its own workdir, tabulate.

  python -m fm_adapt.study --config experiments/peft_quick.py:runlocal --workdir workdirs/peft

The experiment exports `get_config(arg)` and `sweep(add, arg)`; `sweep` calls
`add(name=..., seed=..., **overrides)` once per run, where overrides are config keys, dotted for
nested ones (`**{'model.variant': 'S/16'}`). Runs are trained in the order added, each in
`<workdir>/<name>-s<seed>`; finished runs (with a results.json) are skipped, an interrupted one
resumes. `model_init='run:<name>'` starts a run from the exported weights of an earlier run of
the study. Results are aggregated over seeds into `<workdir>/results.{md,csv,tex}`.
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

from fm_adapt.report import tables
from fm_adapt.train import interrupt, loop, writer as writer_lib

METRICS = ("test/auc", "test/acc", "val/auc")


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


def run_config(module: Any, arg: str | None, run: RunSpec, workdir: pathlib.Path
               ) -> ml_collections.ConfigDict:
  """The config of one run: get_config(arg), the seed, the overrides, `run:` references."""
  config = module.get_config(arg)
  apply_overrides(config, {"seed": run.seed, **run.overrides})
  init = config.get("model_init")
  if isinstance(init, str) and init.startswith("run:"):
    ref = init[len("run:"):]
    matches = sorted(workdir.glob(f"{ref}-s*/export/model.npz"))
    if not matches:
      raise FileNotFoundError(f"model_init={init!r}: run {ref!r} has no export yet; add it to "
                              "the sweep before the runs that start from it.")
    config.model_init = str(matches[0])
  return config


def run_study(spec: str, workdir: str | pathlib.Path, data_dir: str | None = None,
              train: Callable[..., dict] = loop.train_and_evaluate) -> str:
  """Trains every run of a study that has not finished, then writes and returns the table."""
  module, arg = load_experiment(spec)
  workdir = pathlib.Path(workdir)
  runs = expand(module, arg)
  results: dict[str, list[dict]] = {}
  for index, run in enumerate(runs):
    run_dir = workdir / run.dirname
    done = run_dir / "results.json"
    if done.exists():
      writer_lib.console(f"[{index + 1}/{len(runs)}] {run.dirname}: done, skipped")
      result = json.loads(done.read_text())
    else:
      writer_lib.console(f"[{index + 1}/{len(runs)}] {run.dirname}: training")
      result = train(run_config(module, arg, run, workdir), run_dir, data_dir)
    results.setdefault(run.name, []).append(_flat_result(result))
  rows = tables.aggregate(results, METRICS, extra=("trainable_params", "data"))
  markdown = tables.write_tables(workdir, rows, ["run", "seeds", "trainable_params", *METRICS,
                                                 "data"])
  return markdown


def _flat_result(result: Mapping[str, Any]) -> dict[str, Any]:
  data = result.get("data") or {}
  variant = data.get("variant", data.get("name", "")) if isinstance(data, Mapping) else str(data)
  return {**result["metrics"], "trainable_params": result.get("trainable_params"),
          "data": variant}


_CONFIG = flags.DEFINE_string("config", None, "Experiment file and argument: file.py[:arg].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the study.")
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Data directory.")


def main(argv) -> None:
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    table = run_study(_CONFIG.value, _WORKDIR.value, _DATA_DIR.value)
  except KeyboardInterrupt as error:  # Finished runs are skipped and the stopped one resumes.
    interrupt.exit_with_resume_hint(error, _WORKDIR.value)
  print(table, flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
