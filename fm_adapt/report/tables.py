"""Results tables: mean +- std over seeds, written as markdown, CSV and LaTeX.

A metric a run leaves undefined (None or NaN, e.g. an AUC on a split missing a class) is left out
of its group's mean, and the cell says so: `0.850 ± 0.071 (2 of 3 seeds)`; `n/a` when no run of
the group defines it. The CSV has `<metric>_mean`, `_std` and `_n` (runs that define it) columns.
Plain float cells (e.g. a ratio of means) show `digits` significant digits, NaN as `n/a`.
"""
from __future__ import annotations

import csv
import io
import math
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import numpy as np

# The metric columns of a study's table: the best checkpoint's test metrics, then its val AUC.
STUDY_METRICS = ("test/auc", "test/acc", "test/bal_acc", "test/mcc", "val/auc")
# The cost columns of a study's table (mean +- std over seeds, fm_adapt.train.costs): the median
# training-step time in milliseconds, the run's wall time in seconds, its peak memory in MiB.
STUDY_COSTS = ("step_time_ms", "wall_time_s", "peak_memory_mib")


class Stat(NamedTuple):
  """A metric over the runs of a group: mean and sample std over the `n` of `runs` defining it."""
  mean: float
  std: float
  n: int
  runs: int


def _defined(value: Any) -> bool:
  return value is not None and not math.isnan(value)


def mean_std(values: Sequence[float | None]) -> tuple[float, float]:
  """Mean and sample standard deviation (NaN, i.e. undefined, for a single value); None and NaN
  in `values` are left out (`aggregate` counts them)."""
  arr = np.asarray([v for v in values if _defined(v)], np.float64)
  if arr.size == 0:
    return float("nan"), float("nan")
  return float(arr.mean()), float(arr.std(ddof=1)) if arr.size > 1 else float("nan")


def aggregate(groups: Mapping[str, Sequence[Mapping[str, Any]]], metrics: Sequence[str],
              extra: Sequence[str] = ()) -> list[dict[str, Any]]:
  """One row per group: `extra` columns from the first run, a `Stat` per metric, seed count."""
  rows = []
  for group, runs in groups.items():
    row = {"run": group, "seeds": len(runs)}
    row.update({k: runs[0].get(k) for k in extra})
    for metric in metrics:
      values = [r.get(metric) for r in runs]
      row[metric] = Stat(*mean_std(values), sum(map(_defined, values)), len(runs))
    rows.append(row)
  return rows


def ratio_to(rows: Sequence[Mapping[str, Any]], metric: str,
             reference: str | Callable[[str], str | None], name: str) -> list[dict[str, Any]]:
  """The rows with a `name` column: each row's mean of `metric` over its reference row's.

  Args:
    rows: the aggregated rows (`aggregate`).
    metric: the column compared (a `Stat`).
    reference: the run every row is compared with, or a function giving each row's reference
      run from its name (None: no reference, NaN).
    name: the new column.

  NaN where either mean is undefined.

  Raises:
    KeyError: when a reference names no row, naming the runs.
  """
  by_run = {row["run"]: row for row in rows}
  reference_of = reference if callable(reference) else (lambda _: reference)
  out = []
  for row in rows:
    ref = reference_of(row["run"])
    if ref is not None and ref not in by_run:
      raise KeyError(f"No run {ref!r} to compare {metric} of {row['run']!r} with; runs: "
                     f"{list(by_run)}")
    base = float("nan") if ref is None else by_run[ref][metric].mean
    defined = not math.isnan(base) and base > 0
    out.append(dict(row, **{name: row[metric].mean / base if defined else float("nan")}))
  return out


def _cell(value: Any, digits: int) -> str:
  if isinstance(value, Stat):
    if value.n == 0:
      return "n/a"
    text = f"{value.mean:.{digits}f}"
    if value.n > 1:
      text += f" ± {value.std:.{digits}f}"
    return text if value.n == value.runs else f"{text} ({value.n} of {value.runs} seeds)"
  if isinstance(value, int) and not isinstance(value, bool):
    return f"{value:,}"
  if isinstance(value, float):
    return "n/a" if math.isnan(value) else f"{value:.{digits}g}"
  return str(value)


def to_markdown(rows: Sequence[Mapping[str, Any]], columns: Sequence[str], digits: int = 3) -> str:
  """A markdown table."""
  lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
  lines += ["| " + " | ".join(_cell(r.get(c), digits) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def to_csv(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
  """CSV with mean, std and n (runs defining it) columns for each metric."""
  out = io.StringIO()
  writer = csv.writer(out)
  header = []
  for c in columns:
    is_stat = rows and isinstance(rows[0].get(c), Stat)
    header += [f"{c}_mean", f"{c}_std", f"{c}_n"] if is_stat else [c]
  writer.writerow(header)
  for r in rows:
    cells = []
    for c in columns:
      v = r.get(c)
      cells += [v.mean, v.std, v.n] if isinstance(v, Stat) else [v]
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
