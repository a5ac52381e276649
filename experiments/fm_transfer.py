"""What fm_adapt's own foundation model is worth: initialisation x strategy x dataset x seed.

Each MIM initialisation is pretrained inside the study with the same budget: run
`pretrain_<objective>` (seed 0) is `experiments/mim_pretrain.py` with that objective (its
defaults otherwise: ViT-Ti/4 at 28 px, RGB, the pretraining mixture of the data directory's
training images, `pretrain_steps` steps), and the runs that adapt it start from its export
(`model_init='run:pretrain_<objective>'`; the decoder and mask token are left out, the head
starts fresh). Then every initialisation

  scratch    the same ViT at random initialisation
  foundation fm_adapt's foundation model kept in the repository (`fm_adapt.foundation`: MAE,
             700 steps of batch 128; no pretraining run, and always a ViT-Ti/4)
  simmim, mae, frequency, deblur    the export of `pretrain_<objective>`

is adapted with every strategy

  linear_probe   the head alone (frozen encoder; trained on cached features where eligible,
                 `probe='auto'`)
  lora_qv_r8     LoRA rank 8 on the attention query and value kernels, and the head
  full           every parameter

on each dataset (PneumoniaMNIST, BreastMNIST, RetinaMNIST at 28 px; grey images repeated to RGB)
for each seed: AdamW 1e-3 (weight decay 1e-4, 10 % warm-up, cosine), batch 128, `epochs` passes
over the training split (at least `min_steps` steps), the checkpoint of best validation AUC
tested. Run `<flag>_<init>_<strategy>`.

  export FM_ADAPT_DATA_DIR=../shared/data
  python -m fm_adapt.study --workdir workdirs/fm_transfer \
      --config experiments/fm_transfer.py:pretrain_steps=2000,epochs=10

writes, beside the study's results tables, `fm_transfer_table.md` (test AUC and ACC, mean ± std
over seeds, per dataset, with published reference rows: MedMNIST+ (Doerrich et al. 2024;
ImageNet weights, 28 px images zero-padded to 224, mean of 3 seeds) DINO ViT linear probe and
end-to-end ResNet-18 (28), MedMNIST v2 (Yang et al. 2023) ResNet-18 (28)) and
`plots/fm_transfer_auc.png` (test AUC per initialisation and strategy, one panel per dataset,
the reference AUCs as lines). Each pretraining run also leaves its reconstruction pictures and
loss curve in its own directory (`pretrain_<objective>-s0/`).

Arguments (`:key=value,...`): pretrain_steps (default 2000), pretrain_batch (default 256),
pretrain_blr (default 1e-3, the foundation model's: learning rate blr * batch / 256),
epochs (default 10), min_steps (default 50), datasets, inits, strategies (`+`-separated subsets;
default all), seeds (default 3), lr (default 1e-3), runlocal (a seconds-long smoke run: ViT-mu,
pretraining on BreastMNIST's training images, a few steps each, one seed).
"""
from __future__ import annotations

import functools
import math
import pathlib
import re
from collections.abc import Mapping, Sequence
from typing import Any

import ml_collections

from data_pipelines import medmnist
from fm_adapt import config as config_lib
from fm_adapt import foundation
from fm_adapt import study
from fm_adapt.adapt import compose
from fm_adapt.report import plots

DATASETS = ("pneumoniamnist", "breastmnist", "retinamnist")
INITS = ("scratch", "foundation", "simmim", "mae", "frequency", "deblur")
PRETRAINED_HERE = ("simmim", "mae", "frequency", "deblur")  # Each a `pretrain_<init>` run.
SCHED = dict(decay_type="cosine", warmup_percent=0.1)
BATCH = 128
STRATEGIES = {
    "linear_probe": dict(schedule=compose.preset("linear_probe", SCHED), probe="auto"),
    "lora_qv_r8": dict(adapt=[dict(name="lora", rank=8, targets=".*attn/(query|value)/kernel")]),
    "full": dict(schedule=compose.preset("full", SCHED)),
}
REFERENCE_STRATEGY = "full"
# Published test AUC (and ACC where given) at 28 px: (label, seeds, {flag: (auc, acc or None)}).
REFERENCES = (
    ("MedMNIST+ DINO ViT linear probe (ImageNet, 28 px zero-padded to 224)", 3,
     {"pneumoniamnist": (.9729, None), "breastmnist": (.8677, None),
      "retinamnist": (.7199, None)}),
    ("MedMNIST+ ResNet-18 (28) end-to-end (ImageNet)", 3,
     {"pneumoniamnist": (.9501, None), "breastmnist": (.8761, None),
      "retinamnist": (.7041, None)}),
    ("MedMNIST v2 ResNet-18 (28) (from scratch)", 1,
     {"pneumoniamnist": (.944, .854), "breastmnist": (.901, .863), "retinamnist": (.717, .524)}),
)
METRICS = ("test/auc", "test/acc", "val/auc", "recon/loss")


def _pretrain_module() -> Any:
  """`experiments/mim_pretrain.py`, loaded by path."""
  return study.load_experiment(str(pathlib.Path(__file__).with_name("mim_pretrain.py")))[0]


def _subset(value: str, valid: Sequence[str], what: str) -> tuple[str, ...]:
  chosen = tuple(v for v in str(value).split("+") if v.strip())
  unknown = [v for v in chosen if v not in valid]
  if unknown or not chosen or len(set(chosen)) != len(chosen):
    raise ValueError(f"{what}={value!r}: give distinct names, '+'-separated, of {list(valid)}"
                     + (f" (unknown: {unknown})." if unknown else "."))
  return tuple(v for v in valid if v in chosen)


def _positive(value: Any, what: str, kind: type = int) -> Any:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
      kind is int and not isinstance(value, int)):
    raise ValueError(f"{what}={value!r} must be a positive {kind.__name__}.")
  return kind(value)


@functools.lru_cache(maxsize=None)
def parse(arg: str | None) -> ml_collections.FrozenConfigDict:
  """The study's arguments, checked (unknown names list the valid ones)."""
  args = config_lib.parse_arg(
      arg, pretrain_steps=2000, pretrain_batch=256, pretrain_blr=1e-3, epochs=10.0, min_steps=50,
      datasets="+".join(DATASETS), inits="+".join(INITS), strategies="+".join(STRATEGIES),
      seeds=3, lr=1e-3, runlocal=False)
  return ml_collections.FrozenConfigDict(dict(
      pretrain_steps=_positive(args.pretrain_steps, "pretrain_steps"),
      pretrain_batch=_positive(args.pretrain_batch, "pretrain_batch"),
      pretrain_blr=_positive(args.pretrain_blr, "pretrain_blr", float),
      epochs=_positive(args.epochs, "epochs", float),
      min_steps=_positive(args.min_steps, "min_steps"),
      datasets=_subset(args.datasets, DATASETS, "datasets"),
      inits=_subset(args.inits, INITS, "inits"),
      strategies=_subset(args.strategies, tuple(STRATEGIES), "strategies"),
      seeds=_positive(args.seeds, "seeds"), lr=_positive(args.lr, "lr", float),
      runlocal=bool(args.runlocal)))


def pretrain_arg(objective: str, args: Any) -> str:
  """The `experiments/mim_pretrain.py` argument of run `pretrain_<objective>`."""
  return (f"objective={objective},steps={args.pretrain_steps},batch={args.pretrain_batch},"
          f"blr={args.pretrain_blr},size=28,channels=3,runlocal={args.runlocal}")


def _pp(flag: str) -> str:
  """Grey images repeated to the pretrained model's three channels."""
  grey = medmnist.INFO[flag]["n_channels"] == 1
  return ("gray_to_rgb|" if grey else "") + "value_range(-1,1)"


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The adaptation run config shared by the sweep (it sets dataset, init, strategy per run)."""
  args = parse(arg)
  flag = args.datasets[0]
  config = config_lib.base_config()
  config.runlocal = args.runlocal
  config.model_name = "vit"
  config.model = _pretrain_module().classifier_model(pretrain_arg("mae", args))
  config.input.update(dict(data=dict(name="medmnist", flag=flag, size=28), pp=_pp(flag),
                           batch_size=16 if args.runlocal else BATCH, eval_batch_size=256))
  config.evals.val = dict(name="classification", split="val")
  config.evals.test = dict(name="classification", split="test", periodic=False)
  config.best_metric = "val/auc"
  config.loss = dict(name="softmax_xent")
  config.total_steps = args.min_steps
  config.optax_name = "adamw"
  config.lr = args.lr
  config.wd = 1e-4
  config.grad_clip_norm = 1.0
  config.schedule = dict(SCHED)
  config.log_every = 10
  config.keep_ckpts = 1
  config.progress = False
  config.description = "fm_transfer: initialisation x strategy x dataset"
  return config


def config_overrides(base: Mapping[str, Any], target: Mapping[str, Any]) -> dict[str, Any]:
  """Dotted overrides that turn config `base` into `target` (plain dicts, `to_dict()`): a
  nested dict whose keys `target` keeps is changed key by key, any other difference whole."""
  out: dict[str, Any] = {}
  for key, value in target.items():
    old = base.get(key)
    if old == value:
      continue
    if isinstance(old, Mapping) and isinstance(value, Mapping) and set(old) <= set(value):
      out.update({f"{key}.{k}": v for k, v in value.items() if old.get(k) != v})
    else:
      out[key] = value
  missing = sorted(set(base) - set(target))
  if missing:
    raise ValueError(f"Internal: the target config lacks keys {missing} of the base config.")
  return out


def total_steps(flag: str, epochs: float, min_steps: int) -> int:
  """`epochs` passes over the training split in batches of BATCH, at least `min_steps`."""
  n = medmnist.INFO[flag]["n_samples"]["train"]
  return max(min_steps, math.ceil(epochs * math.ceil(n / BATCH)))


def _init_overrides(init: str, base: Mapping[str, Any]) -> dict[str, Any]:
  """The overrides that start an adaptation run from `init`."""
  if init == "scratch":
    return {}
  if init == "foundation":
    model = {} if base["model"] == foundation.MODEL else {"model": dict(foundation.MODEL)}
    return {"model_init": foundation.path(), **model}
  return {"model_init": f"run:pretrain_{init}"}


def sweep(add, arg: str | None = None) -> None:
  """`pretrain_<objective>` (seed 0) for each MIM init, then `<flag>_<init>_<strategy>` per
  seed."""
  args = parse(arg)
  module = _pretrain_module()
  base = get_config(arg).to_dict()
  for init in args.inits:
    if init in PRETRAINED_HERE:
      pretrain = module.get_config(pretrain_arg(init, args)).to_dict()
      pretrain["progress"] = base["progress"]  # The study's setting.
      add(name=f"pretrain_{init}", seed=0, **config_overrides(base, pretrain))
  for seed in range(1 if args.runlocal else args.seeds):
    for flag in args.datasets:
      steps = 3 if args.runlocal else total_steps(flag, args.epochs, args.min_steps)
      for init in args.inits:
        for strategy in args.strategies:
          init_keys = _init_overrides(init, base)
          add(name=f"{flag}_{init}_{strategy}", seed=seed,
              **{"input.data": dict(name="medmnist", flag=flag, size=28),
                 "input.pp": _pp(flag), "total_steps": steps, **init_keys,
                 **STRATEGIES[strategy]})


# ---------------------------------------------------------------------------------------------
# The report: the table per dataset with the published rows, and the AUC picture.

_NAME = re.compile(rf"(?P<flag>{'|'.join(DATASETS)})_(?P<init>{'|'.join(INITS)})_"
                   rf"(?P<strategy>{'|'.join(STRATEGIES)})")


def parse_name(name: str) -> dict[str, str] | None:
  """(flag, init, strategy) of an adaptation run name of this study; None for another name."""
  match = _NAME.fullmatch(name)
  return None if match is None else match.groupdict()


def reference_of(name: str) -> str | None:
  """Step times are compared with full fine-tuning of the same dataset and initialisation."""
  parts = parse_name(name)
  if parts is None:
    return None
  return f"{parts['flag']}_{parts['init']}_{REFERENCE_STRATEGY}"


def _stat(row: Mapping[str, Any] | None, metric: str) -> tuple[float, float]:
  stat = None if row is None else row.get(metric)
  if stat is None or not getattr(stat, "n", 0):
    return float("nan"), float("nan")
  return stat.mean, stat.std


def _fmt(mean: float, std: float = float("nan")) -> str:
  if math.isnan(mean):
    return "–"
  return f"{mean:.3f}" + ("" if math.isnan(std) else f" ± {std:.3f}")


def _dataset_table(flag: str, by_name: Mapping[str, Mapping[str, Any]]) -> str:
  lines = [f"### {flag}", "", "| initialisation | strategy | test AUC | test ACC | trainable | "
           "seeds |", "|---|---|---|---|---:|---:|"]
  for init in INITS:
    for strategy in STRATEGIES:
      row = by_name.get(f"{flag}_{init}_{strategy}")
      if row is None:
        continue
      trainable = f"{int(row['trainable_params']):,}" if row.get("trainable_params") else "–"
      lines.append(f"| {init} | {strategy} | {_fmt(*_stat(row, 'test/auc'))} | "
                   f"{_fmt(*_stat(row, 'test/acc'))} | {trainable} | {row.get('seeds', '–')} |")
  for label, seeds, values in REFERENCES:
    auc, acc = values[flag]
    lines.append(f"| {label} | (published) | {_fmt(auc)} | "
                 f"{_fmt(math.nan if acc is None else acc)} | | {seeds} |")
  return "\n".join(lines)


def _pretraining_table(by_name: Mapping[str, Mapping[str, Any]],
                       results: Mapping[str, Sequence[Mapping[str, Any]]]) -> str:
  lines = ["### Pretraining runs", "", "| run | steps | held-out reconstruction loss | "
           "wall time (s) |", "|---|---:|---:|---:|"]
  for init in INITS:
    name = f"pretrain_{init}"
    if name in by_name:
      steps = (results.get(name) or [{}])[0].get("total_steps", "–")
      wall = _stat(by_name[name], "wall_time_s")[0]
      lines.append(f"| {name} | {steps} | {_fmt(_stat(by_name[name], 'recon/loss')[0])} | "
                   f"{'–' if math.isnan(wall) else f'{wall:.0f}'} |")
  return "\n".join(lines) if len(lines) > 4 else ""


PEFT = ("linear_probe", "lora_qv_r8")  # The parameter-efficient strategies of the goals.


def _delta(value: float, reference: float) -> str:
  return "–" if math.isnan(reference) else f"{value - reference:+.3f}"


def _goals_table(flags: Sequence[str], by_name: Mapping[str, Mapping[str, Any]]) -> str:
  """Issue 13's goals, computed: per dataset and pretrained initialisation, its best PEFT
  strategy (mean test AUC) against the same ViT trained from scratch (full fine-tuning) and
  against the MedMNIST+ DINO ViT linear probe."""
  lines = ["### Goals: best parameter-efficient adaptation vs scratch and vs DINO", "",
           "| dataset | initialisation | best PEFT (test AUC) | scratch, full | vs scratch | "
           "DINO ViT LP | vs DINO |", "|---|---|---|---:|---:|---:|---:|"]
  for flag in flags:
    scratch = _stat(by_name.get(f"{flag}_scratch_full"), "test/auc")[0]
    dino = REFERENCES[0][2][flag][0]
    for init in INITS[1:]:
      peft = [(_stat(by_name.get(f"{flag}_{init}_{s}"), "test/auc")[0], s) for s in PEFT]
      peft = [(auc, s) for auc, s in peft if not math.isnan(auc)]
      if not peft:
        continue
      auc, strategy = max(peft)
      lines.append(f"| {flag} | {init} | {strategy} {auc:.3f} | {_fmt(scratch)} | "
                   f"{_delta(auc, scratch)} | {dino:.3f} | {_delta(auc, dino)} |")
  return "\n".join(lines) if len(lines) > 4 else ""


def report(rows: Sequence[Mapping[str, Any]],
           results: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, str | bytes]:
  """`fm_transfer_table.md` and `plots/fm_transfer_auc.png` from the study's rows."""
  by_name = {row["run"]: row for row in rows}
  parsed = {name: parts for name in by_name if (parts := parse_name(name)) is not None}
  flags = [f for f in DATASETS if any(p["flag"] == f for p in parsed.values())]
  panels: dict[str, dict[str, dict[str, tuple[float, float]]]] = {}
  for name, parts in parsed.items():
    panel = panels.setdefault(parts["flag"], {})
    panel.setdefault(parts["init"], {})[parts["strategy"]] = _stat(by_name[name], "test/auc")
  ordered = {f: {i: panels[f][i] for i in INITS if i in panels[f]} for f in flags}
  references = {f: [("MedMNIST+ DINO ViT LP", REFERENCES[0][2][f][0]),
                    ("MedMNIST v2 ResNet-18", REFERENCES[2][2][f][0])] for f in flags}
  files: dict[str, str | bytes] = {}
  if ordered:
    means = [m for p in ordered.values() for g in p.values() for m, _ in g.values()
             if not math.isnan(m)]
    low = min([0.5, *means]) - 0.05
    files["plots/fm_transfer_auc.png"] = plots.grouped_bars(
        ordered, "test AUC", "Test AUC by initialisation and strategy (mean ± std over seeds)",
        references, ylim=(max(low, 0.0), 1.0))
  sections = [_dataset_table(f, by_name) for f in flags]
  pretraining = _pretraining_table(by_name, results)
  goals = _goals_table(flags, by_name)
  seeds = sorted({row["seeds"] for name, row in by_name.items() if name in parsed})
  files["fm_transfer_table.md"] = (
      "# What fm_adapt's MIM foundation model is worth\n\n"
      f"Test AUC and ACC, mean ± std over seeds ({'/'.join(map(str, seeds)) or '–'}), at 28 px, "
      "the checkpoint of best validation AUC. Initialisations: scratch, fm_adapt's foundation "
      "model (`fm_adapt.foundation`), or the export of this study's `pretrain_<objective>` run "
      "(same steps for each objective). Published rows: "
      "MedMNIST+ (Doerrich et al. 2024; ImageNet weights, 28 px zero-padded to 224, mean of 3 "
      "seeds; AUC only) and MedMNIST v2 (Yang et al. 2023, Table 2; a single run).\n\n"
      + "\n\n".join(s for s in [*sections, goals, pretraining] if s) + "\n")
  return files
