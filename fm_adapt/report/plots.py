"""The pictures of a study: label-efficiency curves, accuracy vs cost, robustness vs severity.

Each function draws one figure from plain numbers and returns it as PNG bytes, so a study can
write it anywhere `etils.epath` reaches (a local directory or `gs://`). Matplotlib runs on its
non-interactive Agg canvas; nothing is shown.
"""
from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence

from matplotlib.backends import backend_agg
from matplotlib import figure as figure_lib

# (x, mean, std): std may be NaN (one seed), drawn without an error bar.
Point = tuple[float, float, float]


def _png(fig: figure_lib.Figure) -> bytes:
  backend_agg.FigureCanvasAgg(fig)
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
  return buffer.getvalue()


def _errorbar(ax, points: Sequence[Point], label: str, **kwargs) -> None:
  points = sorted(p for p in points if not math.isnan(p[1]))
  if not points:
    return
  xs, means, stds = zip(*points)
  ax.errorbar(xs, means, yerr=[0.0 if math.isnan(s) else s for s in stds], label=label,
              marker="o", capsize=3, **kwargs)


def _legend(ax, **kwargs) -> None:
  if ax.get_legend_handles_labels()[0]:
    ax.legend(**kwargs)


def label_efficiency(curves: Mapping[str, Sequence[Point]], metric: str, title: str) -> bytes:
  """One curve per strategy: `metric` (mean +- std over seeds) against the label fraction.

  Args:
    curves: {strategy: [(label fraction, mean, std), ...]}.
    metric: the y-axis label, e.g. 'test AUC'.
    title: the figure's title (e.g. the dataset and backbone).
  """
  fig = figure_lib.Figure(figsize=(5.5, 4))
  ax = fig.add_subplot()
  for name, points in sorted(curves.items()):
    _errorbar(ax, points, name)
  ax.set_xscale("log")
  ax.set_xlabel("label fraction of the training split")
  ax.set_ylabel(metric)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  _legend(ax, fontsize=7)
  return _png(fig)


def pareto_front(points: Sequence[tuple[str, float, float]]) -> list[str]:
  """The names of the points no other point beats: fewer (or equal) parameters and a higher
  (or equal) score, better in at least one. Points with an undefined score are left out.

  Args:
    points: [(name, trainable parameters, score)], higher score better.
  """
  defined = [p for p in points if not math.isnan(p[2])]
  front = []
  for name, cost, score in defined:
    beaten = any(c <= cost and s >= score and (c < cost or s > score) for _, c, s in defined)
    if not beaten:
      front.append(name)
  return front


def score_vs_parameters(points: Sequence[tuple[str, float, float]], metric: str,
                        title: str) -> bytes:
  """Each strategy's score against its trainable parameters (log scale), the Pareto front
  (`pareto_front`) joined by a line and named in the legend.

  Args:
    points: [(strategy, trainable parameters, score)].
    metric: the y-axis label.
    title: the figure's title.
  """
  fig = figure_lib.Figure(figsize=(5.5, 4))
  ax = fig.add_subplot()
  front = set(pareto_front(points))
  for name, cost, score in points:
    if math.isnan(score):
      continue
    ax.scatter([cost], [score], marker="*" if name in front else "o", s=80 if name in front else 30)
    ax.annotate(name, (cost, score), fontsize=7, xytext=(3, 3), textcoords="offset points")
  line = sorted((c, s) for n, c, s in points if n in front)
  if line:
    ax.plot(*zip(*line), linestyle="--", color="grey", label="Pareto front")
    ax.legend(fontsize=7)
  ax.set_xscale("log")
  ax.set_xlabel("trainable parameters")
  ax.set_ylabel(metric)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  return _png(fig)


def robustness_vs_severity(curves: Mapping[str, Sequence[Point]], clean: float | None,
                           metric: str, title: str) -> bytes:
  """One curve per corruption: `metric` against severity 1-5, the clean score as a line.

  Args:
    curves: {corruption: [(severity, mean, std), ...]}.
    clean: the clean test score (drawn dashed), or None.
    metric: the y-axis label, e.g. 'balanced accuracy'.
    title: the figure's title (e.g. the modality and strategy).
  """
  fig = figure_lib.Figure(figsize=(6, 4))
  ax = fig.add_subplot()
  for name, points in sorted(curves.items()):
    _errorbar(ax, points, name)
  if clean is not None and not math.isnan(clean):
    ax.axhline(clean, linestyle="--", color="black", label="clean")
  ax.set_xlabel("severity")
  ax.set_xticks([1, 2, 3, 4, 5])
  ax.set_ylabel(metric)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  _legend(ax, fontsize=6, ncol=2)
  return _png(fig)
