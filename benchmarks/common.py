"""Timing, memory and reporting helpers shared by the benchmarks in this folder.

Only what more than one benchmark needs: step timing, the process's resident memory (Linux
/proc), a description of the machine, and writing a markdown + JSON result into a run directory.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

_STATUS = pathlib.Path('/proc/self/status')
_CLEAR_REFS = pathlib.Path('/proc/self/clear_refs')


def time_calls(fn: Callable[[], Any], n: int) -> tuple[list[float], list[float]]:
  """Calls `fn` n times; returns the wall and process CPU seconds of each call.

  `fn` must block until its work is done (e.g. end in `jax.block_until_ready`). CPU time counts
  every thread of this process, so on an otherwise idle machine it is about wall time x threads;
  when other processes compete for the cores, wall time grows while CPU time grows much less.
  """
  wall, cpu = [], []
  for _ in range(n):
    start, start_cpu = time.perf_counter(), time.process_time()
    fn()
    wall.append(time.perf_counter() - start)
    cpu.append(time.process_time() - start_cpu)
  return wall, cpu


def summarize(times: Sequence[float]) -> dict[str, float]:
  """Median, min, max and inter-quartile range of step times (seconds)."""
  qs = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
  return dict(median=statistics.median(times), min=min(times), max=max(times),
              q1=qs[0], q3=qs[2], n=len(times))


def _status_kib(key: str) -> int | None:
  """A memory line of /proc/self/status in bytes (None off Linux)."""
  try:
    for line in _STATUS.read_text().splitlines():
      if line.startswith(key + ':'):
        return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def rss_bytes() -> int | None:
  """Current resident set size of this process (bytes), or None if unavailable."""
  return _status_kib('VmRSS')


def peak_rss_bytes() -> int | None:
  """Peak resident set size since start or the last `reset_peak_rss` (bytes)."""
  return _status_kib('VmHWM')


def reset_peak_rss() -> bool:
  """Resets the kernel's peak-RSS counter (Linux >= 4.0); returns whether it worked."""
  try:
    _CLEAR_REFS.write_text('5')
  except OSError:
    return False
  return True


def trim_malloc() -> bool:
  """Returns glibc's cached free memory to the OS (`malloc_trim(0)`); False where unavailable.

  Called before an RSS measurement so that memory freed earlier does not hide new allocations.
  """
  try:
    return bool(ctypes.CDLL('libc.so.6').malloc_trim(0))
  except (OSError, AttributeError):
    return False


def load_average() -> tuple[float, float, float]:
  """The 1-, 5- and 15-minute load averages."""
  return os.getloadavg()


def machine_info() -> dict[str, Any]:
  """CPU model, core count, load, library versions and XLA_FLAGS, for the result record."""
  cpu = platform.processor()
  try:
    for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
      if line.startswith('model name'):
        cpu = line.split(':', 1)[1].strip()
        break
  except OSError:
    pass
  try:
    uptime = subprocess.run(['uptime'], capture_output=True, text=True, check=False).stdout
  except OSError:
    uptime = ''
  return dict(cpu=cpu, cores=os.cpu_count(), uptime=uptime.strip(),
              loadavg=load_average(), python=platform.python_version(),
              jax=jax.__version__, xla_flags=os.environ.get('XLA_FLAGS', ''))


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub markdown table; cells are converted with str()."""
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
  lines += ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows]
  return '\n'.join(lines)


def human_bytes(n: float | None) -> str:
  """1536 -> '1.5 KiB'; None -> 'n/a'."""
  if n is None:
    return 'n/a'
  for unit in ('B', 'KiB', 'MiB', 'GiB'):
    if abs(n) < 1024 or unit == 'GiB':
      return f'{n:.0f} {unit}' if unit == 'B' else f'{n:.1f} {unit}'
    n /= 1024
  return f'{n:.1f} GiB'


def write_result(out_dir: str | os.PathLike[str], name: str, markdown: str,
                 record: dict[str, Any]) -> pathlib.Path:
  """Writes `<out_dir>/<name>.md` and `<out_dir>/<name>.json`; returns the directory."""
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  (out / f'{name}.md').write_text(markdown + '\n')
  (out / f'{name}.json').write_text(json.dumps(record, indent=2, default=str) + '\n')
  return out


# Batch per model when --batch is not given: what keeps a full run within its budget on 2 cores.
DEFAULT_BATCH = {'S/16@224': 8, 'Ti/4@28': 32, 'mu/4@28': 8}


def model_parser(doc: str, strategies: Sequence[str]) -> argparse.ArgumentParser:
  """A parser with the flags every ViT benchmark shares: --models, --strategies, --batch."""
  p = argparse.ArgumentParser(description=doc.split('\n', 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default='Ti/4@28,S/16@224',
                 help="comma-separated 'variant@pixels' (default: %(default)s)")
  p.add_argument('--strategies', default=','.join(strategies),
                 help=f'comma-separated subset of {list(strategies)} (default: all)')
  p.add_argument('--batch', type=int, default=None,
                 help=f'batch size for every model (default per model: {DEFAULT_BATCH})')
  return p


def check_model_args(p: argparse.ArgumentParser, args: argparse.Namespace,
                     strategies: Sequence[str], parse_model: Callable[[str], Any]) -> None:
  """Validates --strategies and --models (after --quick) and sets `args.batch_for`."""
  unknown = sorted(set(args.strategies) - set(strategies))
  if unknown:
    p.error(f'unknown strategies {unknown}; valid: {list(strategies)}')
  for model in args.models:
    parse_model(model)
  args.batch_for = {m: args.batch or DEFAULT_BATCH.get(m, 32) for m in args.models}
