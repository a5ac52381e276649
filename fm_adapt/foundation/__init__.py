"""fm_adapt's own foundation model, kept in the repository: what the quickstarts adapt by default.

`mae_vit_ti4_28px.npz` is the export of one masked-image-modelling pretraining run
(`experiments/mim_pretrain.py`), made with

  python -m fm_adapt.main --workdir workdirs/mim_mae_ti4_28 \\
      --config experiments/mim_pretrain.py:objective=mae,steps=700,batch=128,blr=1e-3

  data       the pretraining mixture of `data_pipelines.pretrain_mixture`: the training splits
             only of PneumoniaMNIST, BreastMNIST, RetinaMNIST and AdrenalMNIST3D (2-D slices) at
             28 px, plus 28-px crops of the DRIVE, CHASE_DB1 and Kvasir-SEG training images
             (58,720 images, 3 channels; no validation or test image of any dataset)
  objective  MAE, random masks of 75 % of the 7 x 7 patches, normalised-pixel MSE
  model      ViT-Ti/4 (5.34 M encoder parameters), 28 px, global average pooling
  steps      700 of batch 128 (1.5 epochs), AdamW, lr 5e-4, cosine decay, 5 % warm-up
  hardware   2-core CPU shared with other jobs, 1,126 s wall time; held-out reconstruction loss .874 -> .706
             (the val split of PneumoniaMNIST)

It holds the encoder and the MAE decoder; a classifier (`model_name='vit'`, `MODEL`) loads the
encoder, reports the decoder as unused and the head as missing (`fm_adapt.weights.mim_encoder`).
Its inputs are 28-px images in 3 channels scaled to [-1, 1] (`PP`; grey images repeated).
The sha256 below is the one the README states; a test checks the file against it.
"""
from __future__ import annotations

import pathlib

FILE = pathlib.Path(__file__).with_name("mae_vit_ti4_28px.npz")
SHA256 = "cc69afbe147c4f46f5cd39f21d473d335cc7346a7c7c541824f59949ed97800d"
MODEL = {"variant": "Ti/4", "pool_type": "gap"}
IMAGE_SIZE = 28
PP = "gray_to_rgb|value_range(-1,1)"
COMMAND = ("python -m fm_adapt.main --workdir workdirs/mim_mae_ti4_28 --config "
           "experiments/mim_pretrain.py:objective=mae,steps=700,batch=128,blr=1e-3")


def path() -> str:
  """The foundation model's file.

  Raises:
    FileNotFoundError: the file is missing from this checkout or install, naming how to make it.
  """
  if not FILE.is_file():
    raise FileNotFoundError(
        f"fm_adapt's foundation model {FILE} is missing (a checkout without it, or an install "
        f"that left out package data). Reinstall from the repository, or make it with `{COMMAND}` "
        "and set config.model_init to workdirs/mim_mae_ti4_28/export/model.npz.")
  return str(FILE)
