"""Quickstart: a small ViT trained from scratch on real PneumoniaMNIST chest X-rays.

Trains a ViT-Ti/7 (28 px, 16 patches) for two epochs and evaluates accuracy and AUROC on the
validation and test splits, in about two minutes on a 2-core CPU:

  export FM_ADAPT_DATA_DIR=../shared/data     # holds medmnist/pneumoniamnist.npz
  python -m fm_adapt.main --config experiments/quickstart.py --workdir workdirs/quickstart

Expected (seed 0, 2-core CPU; experiments/RESULTS.md): test AUC ~.90, test accuracy ~.81,
validation AUC ~.96, best step 74 of 74.

By default it reads the official file `<data_dir>/medmnist/pneumoniamnist.npz` (md5-checked).
`:data=subset_b` uses `medmnist_derived/pneumoniamnist_subset_b.npz` instead (real images, other
splits: not the benchmark). `:runlocal` shrinks it to a few seconds.
"""
from __future__ import annotations

import ml_collections

from fm_adapt import config as config_lib

DATA = {
    "official": dict(name="medmnist", flag="pneumoniamnist", size=28),
    "subset_b": dict(name="npz", path="medmnist_derived/pneumoniamnist_subset_b.npz"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """A few-minute ViT run on PneumoniaMNIST."""
  arg = config_lib.parse_arg(arg, data="official", variant="Ti/7", epochs=2, seed=0,
                             runlocal=False)
  if arg.data not in DATA:
    raise ValueError(f"Unknown data {arg.data!r}; valid: {sorted(DATA)}")
  config = config_lib.base_config()
  config.seed = arg.seed
  config.runlocal = arg.runlocal
  config.model_name = "vit"
  config.model = dict(variant=arg.variant, pool_type="gap")
  config.input.update(dict(data=DATA[arg.data], pp="value_range(-1,1)|flip_lr",
                           eval_pp="value_range(-1,1)", batch_size=128, eval_batch_size=256))
  config.loss = dict(name="softmax_xent")
  config.evals.val = dict(name="classification", split="val")
  config.evals.test = dict(name="classification", split="test", periodic=False)
  config.best_metric = "val/auc"
  config.total_epochs = arg.epochs
  config.optax_name = "adamw"
  config.lr = 1e-3
  config.wd = 1e-4
  config.grad_clip_norm = 1.0
  config.schedule = dict(decay_type="cosine", warmup_percent=0.1)
  config.log_every = 10
  config.description = "quickstart: ViT from scratch on PneumoniaMNIST"
  if arg.runlocal:
    config.model.variant = "mu/7"
    config.total_steps = 4
    config.input.batch_size = 32
    config.eval_every = 2
    config.log_every = 2
  return config
