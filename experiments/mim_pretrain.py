"""Masked image modelling pretraining: fm_adapt's own ViT foundation model from medical images.

A ViT (Ti or S; patch 4 at 28 px, patch 8 at 64 px: a 7 x 7 or 8 x 8 grid) learns to
reconstruct corrupted images of the pretraining mixture (`data_pipelines.pretrain_mixture`: the
training images of every MedMNIST file the data directory holds, plus crops of DRIVE, CHASE_DB1
and Kvasir-SEG training images; never a validation or test image) with one objective of
`fm_adapt.objectives.mim`:

  simmim     masked patches as a learnable mask token, linear pixel decoder, L1 on them
  mae        the encoder sees the visible patches only, transformer decoder, MSE on the
             normalised pixels of the masked patches
  frequency  a band of the 2-D spectrum removed, the whole image reconstructed (with `mask`:
             also patches masked, "dual")
  deblur     a Gaussian-blurred input, the sharp image reconstructed (with `mask`: also masked)

  export FM_ADAPT_DATA_DIR=../shared/data
  python -m fm_adapt.main --workdir workdirs/mim_mae_ti4_28 \
      --config experiments/mim_pretrain.py:objective=mae,steps=2000

The run writes, beside the usual files (metrics.jsonl, checkpoints, results.json):
  reconstructions/step_<N>.png   every `image_every` steps: input / model input / reconstruction
                                 of `num_images` held-out images (the val split of `eval_flag`,
                                 never a pretraining image), and their reconstruction loss
                                 (`recon/loss` in metrics.jsonl; the 'reconstruction' evaluator)
  reconstructions/final.png      the same for the final state
  loss_curve.png                 training and held-out loss against the step
  export/model.npz               the weights (encoder, mask token, decoder): adapt it with
                                 `model_name='vit'`, `model=dict(variant=..., pool_type='gap')`
                                 (`classifier_model`) and `model_init=<this file>`; the decoder
                                 and mask token are reported ignored and the head missing
                                 (`fm_adapt.weights.mim_encoder`).

Optimisation (MAE / SimMIM recipes): AdamW (b2 0.95, weight decay 0.05 on kernels), learning
rate blr * batch / 256 (He et al. 2022: blr 1.5e-4), linear warm-up over `warmup` of the steps
then cosine decay to 0, gradient clipping at 5 (SimMIM), horizontal flips. Mask ratio 0.75 for
MAE, 0.6 for SimMIM, 0.5 for a dual frequency / deblurring mask.

Arguments (`:key=value,...`): objective (simmim | mae | frequency | deblur; default mae), mask
(random | block | prior | none; default random for simmim and mae, none for frequency and
deblur), ratio (default as above), prior (edge | intensity, for mask=prior), size (28 | 64),
variant (Ti | S), channels (1 | 3, default 3: grey sources are repeated, so one model adapts to
grey and colour datasets), steps (default 10000), batch (default 256), blr (default 1.5e-4),
warmup (fraction of the steps, default 0.05), image_every (default steps // 10), num_images
(default 8), eval_flag (MedMNIST flag of the held-out images, default pneumoniamnist), runlocal
(a seconds-long smoke run on BreastMNIST's training images alone, ViT-mu).
"""
from __future__ import annotations

import ml_collections

from data_pipelines import medmnist
from fm_adapt import config as config_lib
from fm_adapt.objectives import mim

OBJECTIVES = mim.NAMES
MASKS = ("random", "block", "prior", "none")
PATCH = {28: 4, 64: 8}
VARIANTS = ("Ti", "S")
RATIO = {"simmim": 0.6, "mae": 0.75, "frequency": 0.5, "deblur": 0.5}
DEFAULT_MASK = {"simmim": "random", "mae": "random", "frequency": "none", "deblur": "none"}
BASE_LR = 1.5e-4  # Per 256 images (He et al. 2022).


def _choice(value, valid, what: str):
  if value not in valid:
    raise ValueError(f"{what}={value!r} is not valid; choose one of {list(valid)}.")
  return value


def _positive(value, what: str, kind=int):
  if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0 or (
      kind is int and not isinstance(value, int)):
    raise ValueError(f"{what}={value!r} must be a positive {kind.__name__}.")
  return kind(value)


def parse(arg: str | None) -> ml_collections.ConfigDict:
  """The arguments, checked; unknown keys and values name the valid ones."""
  args = config_lib.parse_arg(
      arg, objective="mae", mask="", ratio=0.0, prior="edge", size=28, variant="Ti", channels=3,
      steps=10000, batch=256, blr=BASE_LR, warmup=0.05, image_every=0, num_images=8,
      eval_flag="pneumoniamnist", runlocal=False)
  _choice(args.objective, OBJECTIVES, "objective")
  args.mask = args.mask or DEFAULT_MASK[args.objective]
  _choice(args.mask, MASKS, "mask")
  if args.mask == "none" and args.objective in ("simmim", "mae"):
    raise ValueError(f"objective={args.objective} masks patches: choose mask=random, block or "
                     "prior.")
  args.ratio = float(args.ratio) or RATIO[args.objective]
  if not 0 < args.ratio < 1:
    raise ValueError(f"ratio={args.ratio} must be in (0, 1).")
  _choice(args.size, tuple(PATCH), "size")
  _choice(args.variant, VARIANTS, "variant")
  _choice(args.channels, (1, 3), "channels")
  for key in ("steps", "batch", "num_images"):
    _positive(args[key], key)
  _positive(args.blr, "blr", float)
  if not 0 <= args.warmup < 1:
    raise ValueError(f"warmup={args.warmup} must be a fraction of the steps in [0, 1).")
  if isinstance(args.image_every, bool) or not isinstance(args.image_every, int) or (
      args.image_every < 0):
    raise ValueError(f"image_every={args.image_every!r} must be an int >= 0 (0: steps // 10).")
  _choice(args.eval_flag, sorted(f for f, i in medmnist.INFO.items() if not i["is_3d"]),
          "eval_flag")
  if args.channels == 1 and medmnist.INFO[args.eval_flag]["n_channels"] == 3:
    raise ValueError(f"eval_flag={args.eval_flag} holds colour images and channels=1: choose a "
                     "grey flag (e.g. pneumoniamnist) or channels=3.")
  return args


def variant(args: ml_collections.ConfigDict) -> str:
  """The ViT variant string, e.g. 'Ti/4' ('mu/4' for runlocal)."""
  return f"{'mu' if args.runlocal else args.variant}/{PATCH[args.size]}"


def classifier_model(arg: str | None = None) -> dict:
  """`config.model` of the classification ViT that adapts this pretraining's export."""
  return dict(variant=variant(parse(arg)), pool_type="gap")


def mask_spec(args: ml_collections.ConfigDict) -> dict | None:
  """`config.loss.mask` of the arguments (None: no spatial mask)."""
  if args.mask == "none":
    return None
  spec = dict(name=args.mask, ratio=args.ratio)
  if args.mask == "prior":
    spec["prior"] = args.prior
  return spec


def eval_pp(args: ml_collections.ConfigDict) -> str:
  """The held-out images' pp: the 28-px file resized to `size`, grey to RGB where needed."""
  ops = [] if args.size == 28 else [f"resize({args.size})"]
  if args.channels == 3 and medmnist.INFO[args.eval_flag]["n_channels"] == 1:
    ops.append("gray_to_rgb")
  return "|".join([*ops, "value_range(-1,1)"])


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The pretraining run of the arguments (module docstring)."""
  args = parse(arg)
  if args.runlocal:
    with args.unlocked():
      args.update(steps=4, batch=16, image_every=2, num_images=4, eval_flag="breastmnist")
  config = config_lib.base_config()
  config.runlocal = args.runlocal
  config.model_name = "vit_mim"
  config.model = classifier_model(arg)
  config.loss = dict(name=args.objective, mask=mask_spec(args))
  data = dict(name="pretrain_mixture", image_size=args.size, channels=args.channels)
  if args.runlocal:
    data["sources"] = [dict(source="medmnist", flag="breastmnist", size=28)]
  config.input.update(dict(data=data, pp="value_range(-1,1)|flip_lr", batch_size=args.batch,
                           eval_batch_size=256, last_batch="carry"))
  every = args.image_every or max(args.steps // 10, 1)
  config.evals.recon = dict(
      name="reconstruction", split="val", pp=eval_pp(args), num_images=args.num_images,
      data=dict(name="medmnist", flag=args.eval_flag, size=28, allow_download=False))
  config.best_metric = None
  config.total_steps = args.steps
  config.optax_name = "adamw"
  config.optax = dict(b2=0.95)
  config.lr = args.blr * args.batch / 256
  config.wd = 0.05
  config.grad_clip_norm = 5.0
  config.schedule = dict(decay_type="cosine", warmup_percent=args.warmup)
  config.log_every = min(50, every)
  config.eval_every = every
  config.checkpoint_every = every
  config.keep_ckpts = 1
  config.description = (f"MIM pretraining: {args.objective}, mask {args.mask} "
                        f"({args.ratio:g}), ViT-{variant(args)}, {args.size} px")
  return config
