"""MedMNIST v2 benchmark protocol (Yang et al., Scientific Data 2023), ResNet baselines, exactly.

Matches the official code (MedMNIST/experiments, `MedMNIST2D/train_and_eval_pytorch.py` and
`MedMNIST2D/models.py`):
- ResNet-18/50 at 28 px (3x3 stride-1 stem, no max-pool, PyTorch's default layer initialisation
  since `models.py` sets none) or at 224 px (torchvision's ResNet and initialisation, images
  resized from 28 px with nearest neighbour, grey replicated to RGB as `--as_rgb` does);
- pixels to [-1, 1] (ToTensor + Normalize(.5, .5)), no augmentation;
- Adam lr 1e-3, batch 128, 100 epochs of ceil(N / 128) steps, each epoch a new shuffle ending
  in a short batch (here: padded and masked, so BatchNorm and the loss see only its real rows);
- lr x0.1 from the first step of epochs 51 and 76 (MultiStepLR milestones 50, 75);
- cross-entropy, or the label-mean BCE (BCEWithLogitsLoss) for multi-label ChestMNIST;
- validation AUC after every epoch; the first epoch with the highest validation AUC is tested.

Steps per run: BreastMNIST 500 (N = 546), RetinaMNIST 900 (N = 1,080), PneumoniaMNIST 3,700
(N = 4,708).

  python -m fm_adapt.main --workdir workdirs/v2_breast_r18_28 \
      --config experiments/medmnist_v2.py:dataset=breastmnist,model=resnet18_28
  python -m fm_adapt.study --workdir workdirs/v2_breast_r18_28_study \
      --config experiments/medmnist_v2.py:dataset=breastmnist,model=resnet18_28

Expected (paper, ResNet-18 (28), test AUC / ACC): BreastMNIST .901 / .863, RetinaMNIST
.717 / .524, PneumoniaMNIST .944 / .854. Measured here: experiments/RESULTS.md.

Arguments: dataset (a MedMNIST flag, or npz:<path relative to the data dir> for a file in the
MedMNIST layout), size (28/64/128/224 official file size), model (resnet18_28 | resnet18_224 |
resnet50_28 | resnet50_224), seed, runlocal (a seconds-long smoke run).
"""
from __future__ import annotations

import ml_collections

from fm_adapt import config as config_lib

MODELS = {
    "resnet18_28": dict(depth=18, stem="cifar", weight_init="pytorch", image=None),
    "resnet18_224": dict(depth=18, stem="imagenet", weight_init="torchvision", image=224),
    "resnet50_28": dict(depth=50, stem="cifar", weight_init="pytorch", image=None),
    "resnet50_224": dict(depth=50, stem="imagenet", weight_init="torchvision", image=224),
}
# The official collection's multi-label flags (BCE instead of cross-entropy).
MULTILABEL = ("chestmnist",)


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
  config.model = dict(depth=spec["depth"], stem=spec["stem"], weight_init=spec["weight_init"])
  resize = f"resize({spec['image']}, method='nearest')|gray_to_rgb|" if spec["image"] else ""
  config.input.update(dict(data=data_config(arg.dataset, arg.size),
                           pp=f"{resize}value_range(-1,1)", batch_size=128, eval_batch_size=256,
                           last_batch="pad"))
  config.loss = (dict(name="sigmoid_xent", label_reduction="mean")
                 if arg.dataset in MULTILABEL else dict(name="softmax_xent"))
  config.evals.val = dict(name="classification", split="val")
  config.evals.test = dict(name="classification", split="test", periodic=False)
  config.best_metric = "val/auc"
  config.total_epochs = 100
  config.optax_name = "adam"
  config.lr = 1e-3
  config.wd = 0.0
  # 100 epochs of whole batches: the boundaries fall on the first steps of epochs 51 and 76.
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
