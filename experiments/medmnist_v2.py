"""MedMNIST v2 benchmark protocol (Yang et al., Scientific Data 2023), ResNet baselines.

ResNet-18/50 at 28 px (CIFAR-style stem) or 224 px (images resized from 28, ImageNet stem),
Adam lr 1e-3, batch 128, 100 epochs, lr x0.1 at 50 % and 75 % of training, cross-entropy
(BCE for multi-label ChestMNIST), validation every epoch, the best-validation-AUC model tested.
Batches run on across epoch boundaries, so 100 epochs are ceil(100 * N / 128) full batches (the
official PyTorch code instead ends each epoch with a smaller batch; both see every image 100
times): 427 steps for BreastMNIST (N = 546), 3,679 for PneumoniaMNIST (N = 4,708).

  python -m fm_adapt.main --workdir workdirs/v2_pneumonia_r18_28 \
      --config experiments/medmnist_v2.py:dataset=pneumoniamnist,model=resnet18_28

Arguments: dataset (a MedMNIST flag, or npz:<path relative to the data dir> for a file in the
MedMNIST layout), size (28/64/128/224 official file size), model (resnet18_28 | resnet18_224 |
resnet50_28 | resnet50_224), seed, runlocal (a seconds-long smoke run).
"""
from __future__ import annotations

import ml_collections

from fm_adapt import config as config_lib

MODELS = {
    "resnet18_28": dict(depth=18, stem="cifar", image=None),
    "resnet18_224": dict(depth=18, stem="imagenet", image=224),
    "resnet50_28": dict(depth=50, stem="cifar", image=None),
    "resnet50_224": dict(depth=50, stem="imagenet", image=224),
}


def data_config(dataset: str, size: int) -> dict:
  """The data config of a MedMNIST flag, or of `npz:<path>` for a MedMNIST-layout file."""
  if dataset.startswith("npz:"):
    return dict(name="npz", path=dataset[len("npz:"):])
  return dict(name="medmnist", flag=dataset, size=size)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The MedMNIST v2 protocol for one dataset and model."""
  arg = config_lib.parse_arg(arg, dataset="pneumoniamnist", size=28, model="resnet18_28",
                             seed=0, runlocal=False)
  if arg.model not in MODELS:
    raise ValueError(f"Unknown model {arg.model!r}; valid: {sorted(MODELS)}")
  spec = MODELS[arg.model]
  config = config_lib.base_config()
  config.seed = arg.seed
  config.runlocal = arg.runlocal
  config.model_name = "resnet"
  config.model = dict(depth=spec["depth"], stem=spec["stem"])
  resize = f"resize({spec['image']})|" if spec["image"] else ""
  config.input.update(dict(data=data_config(arg.dataset, arg.size),
                           pp=f"{resize}value_range(-1,1)", batch_size=128, eval_batch_size=256))
  config.evals.val = dict(name="classification", split="val")
  config.evals.test = dict(name="classification", split="test", periodic=False)
  config.best_metric = "val/auc"
  config.total_epochs = 100
  config.optax_name = "adam"
  config.lr = 1e-3
  config.wd = 0.0
  config.schedule = dict(decay_type="piecewise", boundaries=(0.5, 0.75), scale=0.1)
  config.log_every = 50
  config.eval_every = 0  # Once per epoch.
  config.checkpoint_every = 0  # Once per epoch.
  config.keep_ckpts = 2
  config.description = f"MedMNIST v2 protocol, {arg.model} on {arg.dataset}"
  if arg.runlocal:
    config.total_steps = 6
    config.input.batch_size = 32
    config.eval_every = 3
    config.checkpoint_every = 3
    config.log_every = 2
  return config


def sweep(add, arg: str | None = None) -> None:
  """Three seeds of the protocol (the paper reports single runs; we report mean +- std)."""
  del arg
  for seed in (0, 1, 2):
    add(seed=seed)
