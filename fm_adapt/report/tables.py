"""Results tables: mean +- std over seeds, written as markdown, CSV and LaTeX."""
from __future__ import annotations

import csv
import io
import math
import pathlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np


def mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (NaN, i.e. undefined, for a single value); NaNs in
  `values` are ignored."""
  arr = np.asarray([v for v in values if v is not None and not math.isnan(v)], np.float64)
  if arr.size == 0:
    return float("nan"), float("nan")
  return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else float("nan")


def aggregate(groups: Mapping[str, Sequence[Mapping[str, Any]]], metrics: Sequence[str],
              extra: Sequence[str] = ()) -> list[dict[str, Any]]:
  """One row per group: `extra` columns from the first run, mean/std per metric, seed count."""
  rows = []
  for group, runs in groups.items():
    row = {"run": group, "seeds": len(runs)}
    row.update({k: runs[0].get(k) for k in extra})
    for metric in metrics:
      row[metric] = mean_std([r.get(metric, float("nan")) for r in runs])
    rows.append(row)
  return rows


def _cell(value: Any, digits: int) -> str:
  if isinstance(value, tuple):
    mean, std = value
    if math.isnan(mean):
      return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"
  if isinstance(value, int) and not isinstance(value, bool):
    return f"{value:,}"
  return str(value)


def to_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
  """A markdown table."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(_cell(r.get(c), digits) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """CSV with separate mean and std columns for each metric."""
  out = io.StringIO()
  writer = csv.writer(out)
  header = []
  for c in columns:
    header += [f"{c}_mean", f"{c}_std"] if rows and isinstance(rows[0].get(c), tuple) else [c]
  writer.writerow(header)
  for r in rows:
    cells = []
    for c in columns:
      v = r.get(c)
      cells += list(v) if isinstance(v, tuple) else [v]
    writer.writerow(cells)
  return out.getvalue()


def to_latex(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
  """A LaTeX tabular (booktabs)."""
  esc = lambda s: str(s).replace("_", r"\_").replace("%", r"\%").replace("&", r"\&")
  body = [" & ".join(esc(_cell(r.get(c), digits)).replace("±", r"$\pm$") for c in columns) + r" \\"
          for r in rows]
  return "\n".join([r"\begin{tabular}{" + "l" * len(columns) + "}", r"\toprule",
                    " & ".join(esc(c) for c in columns) + r" \\", r"\midrule", *body,
                    r"\bottomrule", r"\end{tabular}"])


def write_tables(directory: pathlib.Path, rows: Sequence[Mapping[str, Any]],
                 columns: Sequence[str], stem: str = "results") -> str:
  """Writes `<stem>.md`, `.csv` and `.tex`; returns the markdown."""
  directory.mkdir(parents=True, exist_ok=True)
  markdown = to_markdown(rows, columns)
  (directory / f"{stem}.md").write_text(markdown + "\n")
  (directory / f"{stem}.csv").write_text(to_csv(rows, columns))
  (directory / f"{stem}.tex").write_text(to_latex(rows, columns) + "\n")
  return markdown
