"""Graceful stops: Ctrl-C or SIGTERM during training ends the run at a step, checkpointed.

A first SIGINT (Ctrl-C) or SIGTERM (what schedulers such as SLURM and Kubernetes send before
killing a job) only sets a flag; the training loop checks it after every step, saves a
checkpoint of that step and raises `Stopped`. A second Ctrl-C stops at once (the last periodic
checkpoint is then the one resumed). On several JAX processes a signal reaches one host only and
a lone save would hang the others, so there the default behaviour is kept.
"""
from __future__ import annotations

import signal
import threading
from types import FrameType

import jax

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(KeyboardInterrupt):
  """Training stopped on a signal after saving a checkpoint of `step`."""

  def __init__(self, step: int, signum: int):
    super().__init__(f"stopped at step {step} on signal {signum}")
    self.step = step
    self.signum = signum

  @property
  def exit_status(self) -> int:
    """The shell's status for a process ended by the signal: 128 + its number."""
    return 128 + self.signum


class StopOnSignal:
  """Context manager that turns SIGINT / SIGTERM into a stop request read by `signum`."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: stop now.
    self.signum = signum

  def __enter__(self) -> "StopOnSignal":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()
