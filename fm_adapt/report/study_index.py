"""A study's `index.md`: one page linking every table and picture the study wrote."""
from __future__ import annotations

from collections.abc import Mapping, Sequence

from etils import epath

TABLES = ("results.md", "results.csv", "results.tex")


def index(workdir: epath.Path, groups: Sequence[str], report_files: Mapping[str, object],
          failed: Mapping[str, str]) -> str:
  """The markdown of `<workdir>/index.md`.

  Args:
    workdir: the study's directory (links are relative to it).
    groups: the run names (groups of seeds) in the table.
    report_files: the files the experiment's `report` wrote (names relative to `workdir`).
    failed: {run directory: one-line error} of the runs that failed.
  """
  lines = ["# Study index", "", "## Tables", ""]
  lines += [f"- [{name}]({name})" for name in TABLES]
  lines += [f"- [{name}]({name})" for name in sorted(report_files) if not name.endswith(".png")]
  pictures = sorted(name for name in report_files if name.endswith(".png"))
  if pictures:
    lines += ["", "## Pictures", ""]
    lines += [f"![{name}]({name})" for name in pictures]
  lines += ["", "## Runs", ""]
  for group in groups:
    run_dirs = sorted(p.name for p in workdir.glob(f"{group}-s*") if p.is_dir())
    diagrams = sorted(str(p.relative_to(workdir))
                      for d in run_dirs for p in (workdir / d / "predictions").glob("*.png"))
    links = ", ".join(f"[{d}]({d}/results.json)" for d in run_dirs
                      if (workdir / d / "results.json").exists())
    lines.append(f"- {group}: {links}" + (
        "; reliability: " + ", ".join(f"[{p.split('/')[0]}]({p})" for p in diagrams)
        if diagrams else ""))
  if failed:
    lines += ["", "## Failed runs", ""]
    lines += [f"- {name}: {error} ([failure.json]({name}/failure.json))"
              for name, error in sorted(failed.items())]
  return "\n".join(lines) + "\n"
