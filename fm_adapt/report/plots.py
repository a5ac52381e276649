"""The pictures of a study: label-efficiency curves, accuracy vs cost, robustness vs severity,
grouped bars; and of a run: image grids (e.g. reconstructions), curves (e.g. losses).

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


def image_grid(rows: Mapping[str, Sequence], title: str) -> bytes:
  """Images in a grid: one row per entry of `rows`, its name on the left, one column per image.

  Args:
    rows: {row name: images [N, H, W, C] (C = 1 or 3) with values in [0, 1]}; every row holds
      the same number of images.
    title: the figure's title.
  """
  names = list(rows)
  counts = {len(rows[n]) for n in names}
  if not names or len(counts) != 1 or 0 in counts:
    raise ValueError(f"image_grid needs rows of the same non-zero number of images; got "
                     f"{ {n: len(rows[n]) for n in names} }.")
  cols = counts.pop()
  fig = figure_lib.Figure(figsize=(1.2 * cols + 1.2, 1.25 * len(names) + 0.4))
  axes = fig.subplots(len(names), cols, squeeze=False)
  for r, name in enumerate(names):
    for c in range(cols):
      ax = axes[r][c]
      image = rows[name][c]
      if image.shape[-1] == 1:
        ax.imshow(image[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
      else:
        ax.imshow(image, vmin=0.0, vmax=1.0, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
    axes[r][0].set_ylabel(name, fontsize=8)
  fig.suptitle(title, fontsize=9)
  return _png(fig)


def curves(series: Mapping[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str,
           title: str, log_y: bool = False) -> bytes:
  """One line per series of (x, y) points, e.g. training and held-out loss against the step.

  Args:
    series: {name: [(x, y), ...]}; empty series are left out.
    xlabel, ylabel: the axes' labels.
    title: the figure's title.
    log_y: a log-scale y axis.
  """
  fig = figure_lib.Figure(figsize=(5.5, 4))
  ax = fig.add_subplot()
  for name, points in series.items():
    points = sorted(p for p in points if not math.isnan(p[1]))
    if points:
      xs, ys = zip(*points)
      ax.plot(xs, ys, label=name, marker="o" if len(points) < 30 else None, markersize=3)
  if log_y:
    ax.set_yscale("log")
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.set_title(title)
  ax.grid(True, alpha=0.3)
  _legend(ax, fontsize=7)
  return _png(fig)


def grouped_bars(panels: Mapping[str, Mapping[str, Mapping[str, tuple[float, float]]]],
                 ylabel: str, title: str,
                 references: Mapping[str, Sequence[tuple[str, float]]] | None = None,
                 ylim: tuple[float, float] | None = None) -> bytes:
  """Grouped bars (mean with a +-std error bar), one panel per entry, side by side.

  Args:
    panels: {panel (e.g. dataset): {group (x position): {bar (colour): (mean, std)}}}; NaN
      means are not drawn, NaN stds draw no error bar. Bars keep one colour across panels.
    ylabel: the y-axis label.
    title: the figure's title.
    references: {panel: [(label, value)]}: horizontal dashed lines with their labels.
    ylim: the y-axis range (default: matplotlib's).
  """
  bars = list(dict.fromkeys(b for groups in panels.values() for g in groups.values() for b in g))
  fig = figure_lib.Figure(figsize=(4.5 * max(len(panels), 1) + 0.5, 4))
  axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
  width = 0.8 / max(len(bars), 1)
  styles = ("--", ":", "-.")
  for ax, (panel, groups) in zip(axes, panels.items()):
    names = list(groups)
    for j, bar in enumerate(bars):
      xs, means, stds = [], [], []
      for i, group in enumerate(names):
        mean, std = groups[group].get(bar, (float("nan"), float("nan")))
        if not math.isnan(mean):
          xs.append(i - 0.4 + width * (j + 0.5))
          means.append(mean)
          stds.append(0.0 if math.isnan(std) else std)
      if xs:
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=bar, color=f"C{j}")
    for k, (label, value) in enumerate((references or {}).get(panel, ())):
      ax.axhline(value, linestyle=styles[k % len(styles)], color="black", linewidth=0.8,
                 label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=20, fontsize=8)
    ax.set_title(panel, fontsize=9)
    ax.set_ylabel(ylabel)
    if ylim is not None:
      ax.set_ylim(*ylim)
    ax.grid(True, axis="y", alpha=0.3)
    _legend(ax, fontsize=6, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
  fig.suptitle(title, fontsize=10)
  return _png(fig)
