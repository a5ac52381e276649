"""fm_adapt.report.plots: the Pareto front, and every figure is a real PNG."""
import io

import numpy as np
from PIL import Image

from fm_adapt.report import plots

NAN = float("nan")


def _image(png: bytes) -> np.ndarray:
  assert png.startswith(b"\x89PNG")
  return np.asarray(Image.open(io.BytesIO(png)))


def test_pareto_front_keeps_only_unbeaten_points():
  points = [("full", 5e6, .95), ("lora", 3e5, .94), ("bitfit", 1e5, .90), ("probe", 4e3, .90),
            ("adapter", 6e5, .93), ("broken", 10, NAN)]
  # bitfit ties probe's score with more parameters; adapter is beaten by lora.
  assert plots.pareto_front(points) == ["full", "lora", "probe"]


def test_pareto_front_ties_keep_both():
  assert plots.pareto_front([("a", 1, .5), ("b", 1, .5)]) == ["a", "b"]


def test_figures_are_drawn_pngs():
  curves = {"lora": [(0.01, .7, .02), (0.1, .8, NAN), (1.0, .9, .01)], "full": [(1.0, .95, 0.0)]}
  for png in (plots.label_efficiency(curves, "test AUC", "breast, vit"),
              plots.score_vs_parameters([("lora", 3e5, .94), ("full", 5e6, .95)], "AUC", "t"),
              plots.robustness_vs_severity({"jpeg": [(s, 1 - s / 10, NAN) for s in range(1, 6)]},
                                           .9, "bal_acc", "chest_xray")):
    pixels = _image(png)
    assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100
    assert len(np.unique(pixels.reshape(-1, pixels.shape[-1]), axis=0)) > 10  # Something drawn.


def test_undefined_points_are_skipped_not_drawn_as_nan():
  png = plots.label_efficiency({"probe": [(0.1, NAN, NAN)]}, "AUC", "empty")
  assert _image(png).ndim == 3
