"""Foundation models from the catalogue, adapted to a MedMNIST task with each PEFT strategy.

For every catalogue model (`fm_adapt.weights.zoo`) whose checkpoint lies in
$FM_ADAPT_WEIGHTS_DIR (under its published file name, e.g. RETFound_cfp_weights.pth, or as
'<name>.safetensors|.pth|.bin|.npz', e.g. biomedclip.bin), this study fine-tunes it on the
dataset with linear probing, BitFit, LoRA (q, v; rank 8), VPT-deep (10 tokens), parallel adapters
(dim 16) and full fine-tuning, three seeds each, and reports validation / test AUROC and the
trainable parameters of each. A user with RETFound gets RetinaMNIST adapted from RETFound by:

  export FM_ADAPT_DATA_DIR=../shared/data FM_ADAPT_WEIGHTS_DIR=/path/to/weights
  python -m fm_adapt.study --config experiments/fm_zoo_transfer.py:models=retfound_cfp \\
      --workdir workdirs/fm_zoo_transfer

Arguments (after ':', comma-separated): models=NAME+NAME (default: every catalogue model found),
dataset=retinamnist (a MedMNIST flag), size=224 (the MedMNIST+ file size; images are resized to
`image` pixels, default 224, any multiple of the patch: the position embedding is resized the
way the model's family does it), strategies=linear_probe+lora_qv_r8 (default: all), runlocal
(a few steps at twice the patch size, linear probing and LoRA only, one seed).

With no catalogue checkpoint in the weights folder the study says which files it looked for and
exits cleanly (status 0). Models whose input normalisation the catalogue has not verified
(`normalize=None`: RAD-DINO, CheXzero) are left out with a note naming the reason.

Expected figures: none recorded (no foundation-model weights are on the development machines);
add the table here and to experiments/RESULTS.md once it has run.
"""
from __future__ import annotations

import functools
import os
import pathlib

import ml_collections

from fm_adapt import config as config_lib
from fm_adapt.adapt import compose
from fm_adapt.models import vit
from fm_adapt.weights import zoo

SCHED = dict(decay_type="cosine", warmup_percent=0.1)
STRATEGIES = {
    "linear_probe": dict(schedule=compose.preset("linear_probe", SCHED)),
    "bitfit": dict(schedule=compose.preset("bitfit", SCHED)),
    "lora_qv_r8": dict(adapt=[dict(name="lora", rank=8, targets=".*attn/(query|value)/kernel")]),
    "vpt_deep_10": dict(adapt=[dict(name="vpt", mode="deep", num_tokens=10)]),
    "adapter_par_16": dict(adapt=[dict(name="adapter", mode="parallel", dim=16)]),
    "full": dict(schedule=compose.preset("full", SCHED), lr=1e-5),
}
RUNLOCAL_STRATEGIES = ("linear_probe", "lora_qv_r8")


def _names(value: str, valid: list[str], what: str) -> tuple[str, ...]:
  names = tuple(n for n in str(value).split("+") if n)
  unknown = [n for n in names if n not in valid]
  if unknown or not names:
    raise ValueError(f"Unknown {what} {unknown or names}; valid: {sorted(valid)} "
                     "(join several with '+').")
  return names


@functools.lru_cache(maxsize=None)
def parse(arg: str | None) -> ml_collections.FrozenConfigDict:
  """The study's arguments (see the module docstring), parsed once per argument string."""
  args = config_lib.parse_arg(arg, models="+".join(zoo.ENTRIES), dataset="retinamnist",
                              size=224, image=224, strategies="", runlocal=False)
  default = RUNLOCAL_STRATEGIES if args.runlocal else tuple(STRATEGIES)
  strategies = (_names(args.strategies, list(STRATEGIES), "strategies") if args.strategies
                else default)
  return ml_collections.FrozenConfigDict(dict(
      models=_names(args.models, list(zoo.ENTRIES), "catalogue models"),
      dataset=str(args.dataset), size=int(args.size), image=int(args.image),
      strategies=strategies, runlocal=bool(args.runlocal)))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The shared run config; the sweep sets the model, its checkpoint and the strategy."""
  arg = parse(arg)
  config = config_lib.base_config()
  config.runlocal = arg.runlocal
  config.model_name = "vit"
  config.input.update(dict(data=dict(name="medmnist", flag=arg.dataset, size=arg.size),
                           batch_size=32, eval_batch_size=64, last_batch="pad"))
  config.evals.val = dict(name="classification", split="val")
  config.evals.test = dict(name="classification", split="test", periodic=False)
  config.loss = dict(name="softmax_xent")
  config.best_metric = "val/auc"
  config.total_epochs = 10.0
  config.optax_name = "adamw"
  config.lr = 1e-3
  config.wd = 1e-4
  config.grad_clip_norm = 1.0
  config.schedule = dict(SCHED)
  config.log_every = 20
  config.description = f"Catalogue foundation models adapted to {arg.dataset}"
  if arg.runlocal:
    config.total_steps = 4
    config.input.batch_size = 8
    config.eval_every = 4
    config.log_every = 2
    config.progress = False
  return config


def available(arg: str | None = None) -> tuple[list[tuple[zoo.Entry, pathlib.Path]], list[str]]:
  """(the selected catalogue models whose checkpoint is in the weights folder, notes on the
  others)."""
  arg = parse(arg)
  folder = os.environ.get(zoo.WEIGHTS_ENV)
  found, notes = [], []
  for name in arg.models:
    entry = zoo.ENTRIES[name]
    path = zoo.find_file(entry, folder) if folder else None
    if path is None:
      continue
    if entry.normalize is None:
      notes.append(f"{name}: {path} found but left out: its input normalisation is not "
                   "verified in the catalogue (fm_adapt.weights.zoo, normalize=None).")
      continue
    found.append((entry, path))
  return found, notes


def _image_size(entry: zoo.Entry, arg: ml_collections.FrozenConfigDict) -> int:
  patch = vit.decode_variant(entry.model["variant"])["patch_size"]
  image = 2 * patch if arg.runlocal else arg.image
  if image % patch:
    raise ValueError(f"image={image} is not a multiple of {entry.name}'s patch size {patch}.")
  return image


def runs_for(entry: zoo.Entry, path: pathlib.Path, arg: str | None = None) -> list[dict]:
  """The runs of one catalogue model: one per strategy."""
  arg = parse(arg)
  pp = f"resize({_image_size(entry, arg)})|gray_to_rgb|{entry.normalize}"
  common = {"model": zoo.model_config(entry), "model_init": str(path),
            "model_load": dict(name=entry.layout, dont_load=["head/.*", *entry.dont_load]),
            "input.pp": pp}
  return [dict(name=f"{entry.name}_{strategy}", **common, **STRATEGIES[strategy])
          for strategy in arg.strategies]


def sweep(add, arg: str | None = None) -> None:
  """Every strategy on every catalogue model found; exits cleanly (status 0) when none is."""
  found, notes = available(arg)
  for note in notes:
    print(note)
  if not found:
    folder = os.environ.get(zoo.WEIGHTS_ENV)
    looked = {name: zoo.ENTRIES[name].file_names + (f"{name}.<ext>",) for name in parse(arg).models}
    print(f"fm_zoo_transfer: no catalogue checkpoint in {zoo.WEIGHTS_ENV}="
          f"{folder or '(unset)'}; nothing to run. Looked for: {looked}. Put a file there "
          "under one of these names (the catalogue: fm_adapt.weights.zoo.table()).")
    raise SystemExit(0)
  for seed in ((0,) if parse(arg).runlocal else (0, 1, 2)):
    for entry, path in found:
      for run in runs_for(entry, path, arg):
        add(seed=seed, **run)
