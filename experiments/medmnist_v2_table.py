"""The MedMNIST v2 table: ResNet-18 (28) and ResNet-50 (28) over every official 2D file held.

One study over the official 28-px files of the data directory (`<data_dir>/medmnist/<flag>.npz`),
each trained with the exact protocol of `experiments/medmnist_v2.py` (100 epochs, Adam 1e-3,
batch 128, best validation AUC tested) for three seeds. The table is laid out like Table 2 of
Yang et al. (Scientific Data 2023): one row per dataset, test AUC and ACC of each model as
mean +- std over seeds, the paper's single-run numbers beside ours.

  python -m fm_adapt.study --workdir workdirs/medmnist_v2_table \
      --config experiments/medmnist_v2_table.py

writes `<workdir>/medmnist_v2_table.md` beside the study's usual results tables. A user with
the whole collection gets the whole 2D table; here the data directory holds PneumoniaMNIST,
BreastMNIST and RetinaMNIST. 3D files (the paper's 2.5D / 3D / ACS ResNets) are not part of it.

Arguments: models (`+`-separated subset of resnet18_28, resnet50_28), flags (`+`-separated
subset of the held flags; default all), seeds (default 3), data_dir (else $FM_ADAPT_DATA_DIR),
runlocal (a seconds-long smoke run of each).
"""
from __future__ import annotations

import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from data_pipelines import data_dir as data_dir_lib
from data_pipelines import medmnist
from fm_adapt import config as config_lib
from fm_adapt import study

MODELS = ("resnet18_28", "resnet50_28")
# Test (AUC, ACC) of Table 2 of Yang et al. 2023 (single runs).
PAPER = {
    "resnet18_28": {
        "pathmnist": (.983, .907), "chestmnist": (.768, .947), "dermamnist": (.917, .735),
        "octmnist": (.943, .743), "pneumoniamnist": (.944, .854), "retinamnist": (.717, .524),
        "breastmnist": (.901, .863), "bloodmnist": (.998, .958), "tissuemnist": (.930, .676),
        "organamnist": (.997, .935), "organcmnist": (.992, .900), "organsmnist": (.972, .782)},
    "resnet50_28": {
        "pathmnist": (.990, .911), "chestmnist": (.769, .947), "dermamnist": (.913, .735),
        "octmnist": (.952, .762), "pneumoniamnist": (.948, .854), "retinamnist": (.726, .528),
        "breastmnist": (.857, .812), "bloodmnist": (.997, .956), "tissuemnist": (.931, .680),
        "organamnist": (.997, .935), "organcmnist": (.992, .905), "organsmnist": (.972, .770)},
}


def _protocol() -> Any:
  """The single-run protocol module, `experiments/medmnist_v2.py` (loaded by path)."""
  return study.load_experiment(str(pathlib.Path(__file__).with_name("medmnist_v2.py")))[0]


def _args(arg: str | None) -> ml_collections.ConfigDict:
  return config_lib.parse_arg(arg, models="+".join(MODELS), flags="", seeds=3, data_dir="",
                              runlocal=False)


def held_flags(data_dir: str | None = None) -> list[str]:
  """The 2D MedMNIST flags whose official 28-px file the data directory holds, sorted."""
  root = data_dir_lib.resolve_data_dir(data_dir or None) / "medmnist"
  return sorted(flag for flag, info in medmnist.INFO.items()
                if not info["is_3d"] and (root / medmnist.filename(flag, 28)).is_file())


def _chosen(value: str, valid: Sequence[str], what: str) -> list[str]:
  chosen = [v for v in value.split("+") if v]
  unknown = sorted(set(chosen) - set(valid))
  if unknown:
    raise ValueError(f"{what} {unknown} not available; valid: {list(valid)}.")
  return chosen or list(valid)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """One run: `dataset` and `model` are set by the sweep (defaults: PneumoniaMNIST, ResNet-18)."""
  args = config_lib.parse_arg(arg, models="+".join(MODELS), flags="", seeds=3, data_dir="",
                              runlocal=False, dataset="pneumoniamnist", model="resnet18_28")
  protocol_arg = f"dataset={args.dataset},model={args.model},runlocal={args.runlocal}"
  return _protocol().get_config(protocol_arg)


def sweep(add, arg: str | None = None) -> None:
  """Every held flag x model x seed, named `<flag>_<model>`."""
  args = _args(arg)
  models = _chosen(args.models, MODELS, "models")
  flags = _chosen(args.flags, held_flags(args.data_dir), "flags")
  if not flags:
    raise FileNotFoundError("The data directory holds no official 2D MedMNIST file at 28 px "
                            "(<data_dir>/medmnist/<flag>.npz); download them first.")
  protocol = _protocol()
  for flag in flags:
    for model in models:
      for seed in range(args.seeds):
        overrides = {"seed": seed, **_protocol_overrides(protocol, flag, model, args.runlocal)}
        add(name=f"{flag}_{model}", **overrides)


def _protocol_overrides(protocol: Any, flag: str, model: str, runlocal: bool) -> dict[str, Any]:
  """The keys in which the protocol config of (flag, model) differs from the default run's."""
  base = protocol.get_config(f"runlocal={runlocal}").to_dict()
  config = protocol.get_config(f"dataset={flag},model={model},runlocal={runlocal}").to_dict()
  out: dict[str, Any] = {}
  for key, value in config.items():
    if isinstance(value, Mapping) and isinstance(base.get(key), Mapping):
      out.update({f"{key}.{k}": v for k, v in value.items() if base[key].get(k) != v})
    elif base.get(key) != value:
      out[key] = value
  return out


def _cell(row: Mapping[str, Any] | None, metric: str) -> str:
  """`mean ± std` of a `tables.Stat` (the mean alone for one seed); `–` where undefined."""
  stat = None if row is None else row.get(metric)
  if stat is None or not stat.n:
    return "–"
  return f"{stat.mean:.3f}" if math.isnan(stat.std) else f"{stat.mean:.3f} ± {stat.std:.3f}"


def report(rows: Sequence[Mapping[str, Any]], results: Any = None) -> dict[str, str]:
  """The paper-style table from the study's aggregated rows (`run` = `<flag>_<model>`); the
  per-run `results` are not needed.

  Returns:
    {file name: markdown} for the study to write beside its tables.
  """
  by_run = {row["run"]: row for row in rows}
  models = [m for m in MODELS if any(r.endswith(f"_{m}") for r in by_run)]
  flags = sorted({r.rsplit("_", 2)[0] for r in by_run if r.rsplit("_", 2)[0] in medmnist.INFO})
  header = ["dataset"]
  for model in models:
    header += [f"{model} AUC", "paper", f"{model} ACC", "paper"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for flag in flags:
    cells = [flag]
    for model in models:
      row = by_run.get(f"{flag}_{model}")
      auc, acc = PAPER.get(model, {}).get(flag, (None, None))
      cells += [_cell(row, "test/auc"), f"{auc:.3f}" if auc else "–",
                _cell(row, "test/acc"), f"{acc:.3f}" if acc else "–"]
    lines.append("| " + " | ".join(cells) + " |")
  seeds = sorted({row.get("seeds") for row in rows if row.get("seeds")})
  note = (f"\nOurs: mean ± std over {', '.join(map(str, seeds))} seeds, MedMNIST v2 protocol "
          "(experiments/medmnist_v2.py). Paper: Yang et al. 2023, Table 2, single runs.\n")
  return {"medmnist_v2_table.md": "\n".join(lines) + "\n" + note}
