"""fm_adapt.report.plots: image grids, curves and grouped bars are real PNGs of the right
layout; bad grids are errors."""
import io

import numpy as np
import pytest
from PIL import Image

from fm_adapt.report import plots

NAN = float("nan")


def _image(png: bytes) -> np.ndarray:
  assert png.startswith(b"\x89PNG")
  return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))


def test_image_grid_draws_the_images_one_column_each():
  rng = np.random.default_rng(0)
  grey = {name: rng.uniform(size=(3, 8, 8, 1)) for name in ("input", "masked", "recon")}
  narrow = _image(plots.image_grid(grey, "3 images"))
  wide = _image(plots.image_grid({k: np.concatenate([v, v]) for k, v in grey.items()},
                                 "6 images"))
  assert wide.shape[1] > 1.6 * narrow.shape[1]
  # A white image shows white pixels, a black one black: the [0, 1] range is kept.
  black_white = {"r": np.stack([np.zeros((8, 8, 3)), np.ones((8, 8, 3))])}
  pixels = _image(plots.image_grid(black_white, "")).reshape(-1, 3)
  assert (pixels.sum(1) == 0).sum() > 1000


def test_image_grid_refuses_rows_of_different_lengths():
  with pytest.raises(ValueError, match="rows of the same non-zero number of images"):
    plots.image_grid({"a": np.zeros((2, 4, 4, 1)), "b": np.zeros((3, 4, 4, 1))}, "")
  with pytest.raises(ValueError, match="rows of the same non-zero number of images"):
    plots.image_grid({}, "")


def test_curves_and_grouped_bars_are_drawn():
  png = plots.curves({"train": [(1, 2.0), (2, 1.5), (3, NAN)], "val": [], "held": [(2, 1.7)]},
                     "step", "loss", "title", log_y=True)
  assert _image(png).shape[0] > 100
  panels = {"breast": {"scratch": {"probe": (.7, .01), "full": (.8, NAN)},
                       "mae": {"probe": (.85, .02), "full": (NAN, NAN)}},
            "retina": {"scratch": {"lora": (.6, .05)}}}
  one = _image(plots.grouped_bars({"breast": panels["breast"]}, "AUC", "t"))
  two = _image(plots.grouped_bars(panels, "AUC", "t", {"breast": [("DINO", .87)]},
                                  ylim=(0.5, 1.0)))
  assert two.shape[1] > 1.5 * one.shape[1]  # One panel per entry, side by side.
