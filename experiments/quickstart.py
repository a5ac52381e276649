"""Quickstart: fm_adapt's own foundation model fine-tuned on real PneumoniaMNIST chest X-rays.

Fine-tunes the project's MIM-pretrained ViT-Ti/4 (`fm_adapt.foundation`: MAE on the training
images of the MedMNIST and retinal / endoscopy sets, kept in the repository) for one epoch
(batch 64, AdamW 5e-4) and evaluates accuracy and AUROC on the validation and test splits:

  export FM_ADAPT_DATA_DIR=../shared/data     # holds medmnist/pneumoniamnist.npz
  python -m fm_adapt.main --config experiments/quickstart.py --workdir workdirs/quickstart

Expected (seed 0, quiet 2-core CPU, 109 s wall): test AUC .903, test accuracy .819, validation
AUC .965, best step 74 of 74 (experiments/RESULTS.md).

`:init=scratch` trains a ViT-Ti/7 from scratch instead, two epochs of batch 128 (about two
minutes; test AUC ~.90, test accuracy ~.81, validation AUC ~.96). `epochs=N` sets the epochs of
either. By default it reads the official file
`<data_dir>/medmnist/pneumoniamnist.npz` (md5-checked). `:data=subset_b` uses
`medmnist_derived/pneumoniamnist_subset_b.npz` instead (real images, other splits: not the
benchmark). `:runlocal` shrinks it to a few seconds (a ViT-mu/7 from scratch, unless
`init=foundation` is given too).
"""
from __future__ import annotations

import ml_collections

from fm_adapt import config as config_lib
from fm_adapt import foundation

INITS = ("foundation", "scratch")
DATA = {
    "official": dict(name="medmnist", flag="pneumoniamnist", size=28),
    "subset_b": dict(name="npz", path="medmnist_derived/pneumoniamnist_subset_b.npz"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """A few-minute ViT run on PneumoniaMNIST, from the foundation model or from scratch."""
  arg = config_lib.parse_arg(arg, data="official", init="", variant="", epochs=0, seed=0,
                             runlocal=False)
  if arg.data not in DATA:
    raise ValueError(f"Unknown data {arg.data!r}; valid: {sorted(DATA)}")
  init = arg.init or ("scratch" if arg.runlocal else "foundation")
  if init not in INITS:
    raise ValueError(f"Unknown init {init!r}; valid: {list(INITS)}")
  if init == "foundation" and arg.variant:
    raise ValueError(f"variant={arg.variant} applies to init=scratch: the foundation model is a "
                     f"ViT-{foundation.MODEL['variant']}.")
  config = config_lib.base_config()
  config.seed = arg.seed
  config.runlocal = arg.runlocal
  config.model_name = "vit"
  config.model = dict(variant=arg.variant or "Ti/7", pool_type="gap")
  config.input.update(dict(data=DATA[arg.data], pp="value_range(-1,1)|flip_lr",
                           eval_pp="value_range(-1,1)", batch_size=128, eval_batch_size=256))
  config.loss = dict(name="softmax_xent")
  config.evals.val = dict(name="classification", split="val")
  config.evals.test = dict(name="classification", split="test", periodic=False)
  config.best_metric = "val/auc"
  config.total_epochs = arg.epochs or 2
  config.optax_name = "adamw"
  config.lr = 1e-3
  config.wd = 1e-4
  config.grad_clip_norm = 1.0
  config.schedule = dict(decay_type="cosine", warmup_percent=0.1)
  config.log_every = 10
  config.description = "quickstart: ViT from scratch on PneumoniaMNIST"
  if init == "foundation":
    _from_foundation(config, arg)
  if arg.runlocal:
    if init == "scratch":
      config.model.variant = "mu/7"
    config.total_steps = 4
    config.input.batch_size = 32
    config.eval_every = 2
    config.log_every = 2
  return config


def _from_foundation(config: ml_collections.ConfigDict, arg: ml_collections.ConfigDict) -> None:
  """Fine-tunes fm_adapt's foundation model: its architecture and input, a fresh head."""
  config.model = dict(foundation.MODEL)
  config.model_init = foundation.path()
  config.model_load = dict(dont_load=["head/.*"])
  config.input.pp = f"{foundation.PP}|flip_lr"
  config.input.eval_pp = foundation.PP
  config.input.batch_size = 64  # One epoch of 74 steps: under two minutes on 2 cores.
  if not arg.epochs:
    config.total_epochs = 1
  config.lr = 5e-4
  config.description = "quickstart: fm_adapt's MIM foundation model fine-tuned on PneumoniaMNIST"
