"""Reliability diagrams (PNG): accuracy against confidence in equal-width bins.

`plot_reliability(confidences, correct, path)` draws one panel per (confidences, correct) pair,
side by side (e.g. before and after temperature scaling, or one per method of a study). Each
panel shows the accuracy of each bin (bars), its gap to the mean confidence (red), the diagonal
of perfect calibration, the ECE (`calibration.ece`'s bins) and how many examples fall in each bin.
Drawn with matplotlib's object API and its Agg canvas (no pyplot, no global backend switch);
written through `etils.epath` (gs:// works), whole (a temporary name, then renamed).
"""
from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from etils import epath
from matplotlib.backends import backend_agg
from matplotlib import figure as figure_lib

from fm_adapt.evaluators import calibration
from fm_adapt.train import files

Arrays = np.ndarray | Sequence[np.ndarray]


def _panels(confidences: Arrays, correct: Arrays) -> list[tuple[np.ndarray, np.ndarray]]:
  """[(confidences, correct)] per panel; one 1-D array each is one panel."""
  single = isinstance(confidences, np.ndarray) and confidences.ndim == 1
  confs = [confidences] if single else list(confidences)
  rights = [correct] if single else list(correct)
  if len(confs) != len(rights) or not confs:
    raise ValueError(f"plot_reliability: {len(confs)} confidence arrays for {len(rights)} "
                     "correctness arrays; give one of each per panel (at least one).")
  panels = []
  for conf, right in zip(confs, rights):
    conf, right = np.asarray(conf, np.float64), np.asarray(right)
    if conf.ndim != 1 or conf.shape != right.shape or len(conf) == 0:
      raise ValueError(f"plot_reliability: confidences {conf.shape} and correct {right.shape} "
                       "must be 1-D arrays of the same non-zero length.")
    if not np.isfinite(conf).all() or conf.min() < 0 or conf.max() > 1 + 1e-6:
      raise ValueError("plot_reliability: confidences must be finite and in [0, 1].")
    panels.append((conf, right.astype(bool)))
  return panels


def _draw(ax, conf: np.ndarray, correct: np.ndarray, num_bins: int, title: str) -> None:
  bins = calibration.equal_width_bins(conf, correct, num_bins)
  width = np.diff(bins.edges)
  left, filled = bins.edges[:-1], bins.count > 0
  accuracy = np.where(filled, bins.accuracy, 0.0)
  confidence = np.where(filled, bins.confidence, 0.0)
  ax.bar(left, accuracy, width=width, align="edge", color="tab:blue", edgecolor="black",
         label="accuracy")
  ax.bar(left[filled], (confidence - accuracy)[filled], bottom=accuracy[filled],
         width=width[filled], align="edge", color="tab:red", alpha=0.35, edgecolor="tab:red",
         label="gap to confidence")
  ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
  for x, w, n in zip(left, width, bins.count):
    if n:
      ax.text(x + w / 2, 0.02, str(int(n)), ha="center", va="bottom", fontsize=6, rotation=90)
  ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy",
         title=f"{title}\nECE = {calibration.bins_ece(bins):.4f}, acc = {correct.mean():.4f}, "
               f"n = {len(conf)}")
  ax.set_aspect("equal")
  ax.legend(loc="upper left", fontsize=7)


def plot_reliability(confidences: Arrays, correct: Arrays, path: str | os.PathLike, *,
                     titles: Sequence[str] | None = None, num_bins: int = calibration.NUM_BINS,
                     suptitle: str = "") -> epath.Path:
  """Writes a reliability diagram as PNG.

  Args:
    confidences: one 1-D array of confidences in [0, 1] (one panel), or a list of them.
    correct: the matching 1-D bool array(s): whether each prediction was right.
    path: the PNG to write (its directory is created; an existing file is replaced).
    titles: one title per panel (default 'panel 1', ...).
    num_bins: equal-width confidence bins.
    suptitle: a title above all panels.

  Returns:
    The written path.
  """
  panels = _panels(confidences, correct)
  titles = list(titles) if titles is not None else [f"panel {i + 1}" for i in range(len(panels))]
  if len(titles) != len(panels):
    raise ValueError(f"plot_reliability: {len(titles)} titles for {len(panels)} panels.")
  fig = figure_lib.Figure(figsize=(4.2 * len(panels), 4.6))
  backend_agg.FigureCanvasAgg(fig)
  axes = fig.subplots(1, len(panels), squeeze=False)[0]
  for ax, (conf, right), title in zip(axes, panels, titles):
    _draw(ax, conf, right, num_bins, title)
  if suptitle:
    fig.suptitle(suptitle)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120)
  path = files.as_path(path)
  with files.whole_file(path) as f:  # Whole or not at all, locally or on gs://.
    f.write(buffer.getvalue())
  return path
