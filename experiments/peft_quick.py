"""Parameter-efficient adaptation strategies side by side on PneumoniaMNIST.

ViT strategies adapt fm_adapt's own foundation model (`fm_adapt.foundation`: a ViT-Ti/4
pretrained with MAE on the training images of the MedMNIST and retinal / endoscopy sets, kept in
the repository; grey images repeated to its 3 channels); CNN strategies start from the real
ImageNet-pretrained EfficientNet-Lite0 weights. Each strategy reports its trainable parameters
and validation / test AUROC of the best-validation-AUC checkpoint:

  export FM_ADAPT_DATA_DIR=../shared/data FM_ADAPT_WEIGHTS_DIR=../shared/weights
  python -m fm_adapt.study --config experiments/peft_quick.py:runlocal --workdir workdirs/peft_quick

`:runlocal` is the seconds-per-run smoke version (1 seed); without it every strategy trains for
a few epochs over 3 seeds. `backbones=vit` or `backbones=cnn` restricts the study.

Expected figures: none recorded yet for the full study (only `:runlocal` smoke runs, whose
AUROCs mean nothing); add the table here and to experiments/RESULTS.md once it has run.
"""
from __future__ import annotations

import functools

import ml_collections

from fm_adapt import config as config_lib
from fm_adapt import foundation
from fm_adapt.adapt import compose

PNEUMONIA = dict(name="medmnist", flag="pneumoniamnist", size=28)
EFFICIENTNET_WEIGHTS = "efficientnet-lite0-57934424.npz"
SCHED = dict(decay_type="cosine", warmup_percent=0.1)

VIT_STRATEGIES = {
    "full": dict(schedule=compose.preset("full", SCHED)),
    "linear_probe": dict(schedule=compose.preset("linear_probe", SCHED)),
    "bitfit": dict(schedule=compose.preset("bitfit", SCHED)),
    "lora_qv_r8": dict(adapt=[dict(name="lora", rank=8, targets=".*attn/(query|value)/kernel")]),
    "lora_all_r8": dict(adapt=[dict(name="lora", rank=8,
                                    targets=".*(attn/(query|key|value|out)|mlp/fc[12])/kernel")]),
    "vpt_deep_10": dict(adapt=[dict(name="vpt", mode="deep", num_tokens=10)]),
    "ept_10": dict(adapt=[dict(name="ept", num_tokens=10)]),
    "adapter_seq_16": dict(adapt=[dict(name="adapter", mode="sequential", dim=16)]),
    "lora_qv+vpt": dict(adapt=[dict(name="lora", rank=8, targets=".*attn/(query|value)/kernel"),
                               dict(name="vpt", mode="shallow", num_tokens=10)]),
}
CNN_STRATEGIES = {
    "full": dict(schedule=compose.preset("full", SCHED)),
    "linear_probe": dict(schedule=compose.preset("linear_probe", SCHED)),
    "bitfit": dict(schedule=compose.preset("bitfit", SCHED)),
    "lora_1x1_r8": dict(adapt=[dict(name="lora", rank=8,
                                    targets=r"block_\d+/(expand_conv|project_conv)/kernel")]),
    "adapter": dict(adapt=[dict(name="adapter", reduction=8)]),
}


BACKBONES = ("vit", "cnn")


@functools.lru_cache(maxsize=None)
def parse(arg: str | None) -> ml_collections.FrozenConfigDict:
  """The study's arguments, parsed once per argument string (get_config and sweep share them).

  Returns:
    runlocal (bool) and backbones (a tuple of BACKBONES).

  Raises:
    ValueError: for an unknown argument or backbone (listing the valid ones).
  """
  args = config_lib.parse_arg(arg, runlocal=False, backbones=",".join(BACKBONES))
  backbones = tuple(b.strip() for b in str(args.backbones).split(",") if b.strip())
  unknown = [b for b in backbones if b not in BACKBONES]
  if unknown or not backbones:
    raise ValueError(f"Unknown backbones {unknown or backbones}; valid: a comma-separated "
                     f"subset of {list(BACKBONES)}.")
  return ml_collections.FrozenConfigDict(dict(runlocal=bool(args.runlocal), backbones=backbones))


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The shared run config; the sweep sets backbone, data and strategy per run."""
  arg = parse(arg)
  config = config_lib.base_config()
  config.runlocal = arg.runlocal
  config.model_name = "vit"
  config.model = dict(foundation.MODEL)  # The foundation model's architecture, also runlocal.
  config.input.update(dict(data=PNEUMONIA, pp=foundation.PP, batch_size=64,
                           eval_batch_size=256))
  config.evals.val = dict(name="classification", split="val")
  config.evals.test = dict(name="classification", split="test", periodic=False)
  config.loss = dict(name="softmax_xent")  # PneumoniaMNIST: one label of 2 classes.
  config.total_epochs = 5.0
  config.optax_name = "adamw"
  config.lr = 1e-3
  config.wd = 1e-4
  config.grad_clip_norm = 1.0
  config.schedule = dict(SCHED)
  config.log_every = 20
  config.description = "PEFT strategies on PneumoniaMNIST"
  if arg.runlocal:
    config.total_steps = 6
    config.input.batch_size = 32
    config.eval_every = 6
    config.log_every = 3
    config.progress = False
  return config


def _vit_runs() -> list[dict]:
  """Every ViT strategy on fm_adapt's foundation model (a fresh head)."""
  return [dict(name=f"vit_{name}", model_init=foundation.path(),
               model_load=dict(dont_load=["head/.*"]), **strategy)
          for name, strategy in VIT_STRATEGIES.items()]


def _cnn_runs(runlocal: bool) -> list[dict]:
  common = {"model_name": "efficientnet", "model": dict(dropout=0.2),
            "model_init": EFFICIENTNET_WEIGHTS, "model_load": dict(dont_load=["head/.*"]),
            "input.pp": f"resize({32 if runlocal else 96})|gray_to_rgb|value_range(-1,1)"}
  if runlocal:
    common["input.batch_size"] = 16
  # Frozen-backbone strategies keep BatchNorm in inference mode (its statistics frozen too).
  return [dict(name=f"effnet_{name}", **common, **strategy, frozen_statistics=name != "full")
          for name, strategy in CNN_STRATEGIES.items()]


def sweep(add, arg: str | None = None) -> None:
  """Every strategy on each backbone; one seed in runlocal mode, three otherwise."""
  arg = parse(arg)
  runs = (_vit_runs() if "vit" in arg.backbones else []) + (
      _cnn_runs(arg.runlocal) if "cnn" in arg.backbones else [])
  for seed in ((0,) if arg.runlocal else (0, 1, 2)):
    for run in runs:
      add(seed=seed, **run)
