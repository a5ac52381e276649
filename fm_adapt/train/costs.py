"""What a run costs: median training-step time, wall time and peak memory, for `results.json`.

Step time (`step_time_s`). The loop never waits for a step just to time it: after dispatching
step s it waits for step s-1's loss (the finiteness check, one step late), and for step s itself
when it logs, evaluates or saves s. Each such wait marks the moment a step is known to be done
(`StepTimer.done`); the time between the marks of two consecutive steps is one step as the loop
runs it: the update on the devices, overlapped with reading the next batch on the host. Left
out: the first step a process runs (it compiles, and has no earlier mark), and every step whose
interval holds an evaluation, a checkpoint save or a stop (`StepTimer.pause` after them).
Logged steps count: a logged step is waited for before the next is dispatched, so with
`log_every=1` every step is timed without overlap. `step_time_s` is the median over the timed
steps, `timed_steps` how many there were. Both cover the steps this process ran: a resumed run
(`resumed_from_step` > 0) times only the steps after the resume.

Wall time (`wall_time_s`): from the state's initialisation (or restore) to the end of the final
evaluation and export, in this process (again: after a resume, this process's share). Building
the data and the model before it is left out.

Peak memory (`peak_memory_bytes`, `peak_memory_source`): the devices' allocator peak,
`memory_stats()['peak_bytes_in_use']` (the largest over this process's devices), where the
backend gives one ('device_peak_bytes_in_use'); else the process's peak resident set size
('process_peak_rss': `/proc/self/status` VmHWM, reset at the run's start on Linux; elsewhere
`resource.getrusage` ru_maxrss). A device peak cannot be reset, so in a process that ran an
earlier run (a study) it may be that run's: `peak_memory_upper_bound` is then True (the peak did
not grow during this run), and the value bounds this run's peak from above.
"""
from __future__ import annotations

import pathlib
import resource
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import jax

_CLEAR_REFS = pathlib.Path("/proc/self/clear_refs")
_STATUS = pathlib.Path("/proc/self/status")


class StepTimer:
  """Times training steps from the moments the loop already waits for them (module docstring)."""

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    self._clock = clock
    self._mark: tuple[int, float] | None = None  # (step, time) of the newest mark, None: paused.
    self._newest = -1
    self.durations: list[float] = []

  def done(self, step: int) -> None:
    """Marks that `step` is done (its result was waited for); a step marked before is ignored."""
    if step <= self._newest:
      return
    now = self._clock()
    if self._mark is not None and step == self._mark[0] + 1:
      self.durations.append(now - self._mark[1])
    self._mark, self._newest = (step, now), step

  def pause(self) -> None:
    """The time until the next mark holds other work (evaluation, saving): it is not timed."""
    self._mark = None

  def median(self) -> float | None:
    """The median step time in seconds; None when no step was timed."""
    return statistics.median(self.durations) if self.durations else None


def _rss_peak_bytes() -> tuple[int, bool]:
  """(peak RSS in bytes, whether it was read from VmHWM, which `reset_peak_rss` resets)."""
  try:
    for line in _STATUS.read_text().splitlines():
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) * 1024, True
  except OSError:
    pass
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024), False


def _device_peak_bytes() -> int | None:
  """The largest `peak_bytes_in_use` of this process's devices; None where a backend has none."""
  peaks = [(device.memory_stats() or {}).get("peak_bytes_in_use")
           for device in jax.local_devices()]
  return None if not peaks or None in peaks else int(max(peaks))


class RunCosts:
  """The wall clock, step timer and memory baseline of one run in this process."""

  def __init__(self, clock: Callable[[], float] = time.perf_counter):
    """Starts the wall clock and resets the peak-RSS counter where the kernel allows it.

    Set `resumed_from_step` once the run knows where it starts.
    """
    self._clock = clock
    self._start = clock()
    self.resumed_from_step = 0
    self.step_timer = StepTimer(clock)
    self._device_peak_before = _device_peak_bytes()
    try:
      _CLEAR_REFS.write_text("5")  # Linux >= 4.0: VmHWM restarts from the current RSS.
      self._rss_reset = True
    except OSError:
      self._rss_reset = False

  def fields(self) -> dict[str, Any]:
    """The cost fields of `results.json` (module docstring), as of now."""
    device_peak = _device_peak_bytes()
    if device_peak is not None:
      peak, source = device_peak, "device_peak_bytes_in_use"
      before = self._device_peak_before or 0
      upper_bound = before > 0 and device_peak <= before
    else:
      (peak, from_status), source = _rss_peak_bytes(), "process_peak_rss"
      upper_bound = not (from_status and self._rss_reset)
    return {"step_time_s": self.step_timer.median(),
            "timed_steps": len(self.step_timer.durations),
            "resumed_from_step": self.resumed_from_step,
            "wall_time_s": self._clock() - self._start,
            "peak_memory_bytes": peak, "peak_memory_source": source,
            "peak_memory_upper_bound": bool(upper_bound)}
