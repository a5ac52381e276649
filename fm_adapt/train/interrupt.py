"""Graceful stops: Ctrl-C or SIGTERM during training ends the run at a step, checkpointed.

A first SIGINT (Ctrl-C) or SIGTERM (what schedulers such as SLURM and Kubernetes send before
killing a job) only sets a flag; the training loop asks `requested(step)` after every step,
saves a checkpoint of that step and raises `Stopped`. A second Ctrl-C stops at once (the last
periodic checkpoint is then the one resumed).

On several JAX processes a signal may reach one host only, and a lone save would hang the
others: there JAX's pre-emption sync point decides (the distributed runtime catches SIGTERM on
any process and `reached_preemption_sync_point` turns true on every process at the same step),
so all processes save the same step and exit with the resume hint.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

import jax
from jax.experimental import multihost_utils

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
  """Context manager that turns SIGINT / SIGTERM into a stop request (`requested`)."""

  def __init__(self):
    self.signum: int | None = None
    self._previous: dict[int, object] = {}

  def _handle(self, signum: int, frame: FrameType | None) -> None:
    del frame
    if self.signum == signal.SIGINT and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C: stop now.
    self.signum = signum

  def requested(self, step: int) -> bool:
    """Whether training should stop after `step` (every process must ask at every step)."""
    if (jax.process_count() > 1 and self.signum is None
        and multihost_utils.reached_preemption_sync_point(step)):
      self.signum = signal.SIGTERM
    return self.signum is not None

  def __enter__(self) -> "StopOnSignal":
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc_info) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()


def exit_with_resume_hint(error: KeyboardInterrupt, workdir: str) -> NoReturn:
  """Says how to resume a run (or study) stopped by `error`, then exits at once.

  The exit skips interpreter teardown, which XLA threads stopped mid-compile can crash;
  checkpoints are atomic (an unfinished one is never restored), as for a killed run.

  Args:
    error: the `Stopped` (checkpoint saved) or plain `KeyboardInterrupt` that ended the work.
    workdir: the `--workdir` of the command, named in the hint.
  """
  if isinstance(error, Stopped):
    message = (f"Stopped at step {error.step}; its checkpoint is in {workdir}: run the same "
               "command to resume from it.")
    status = error.exit_status
  elif hasattr(error, "exit_status"):  # e.g. data_pipelines.download.Interrupted: says its own.
    message, status = str(error), error.exit_status
  else:
    message = (f"Interrupted. Checkpoints are in {workdir}; run the same command to resume "
               "from the last one.")
    status = 128 + signal.SIGINT
  print("\n" + message, file=sys.stderr, flush=True)
  sys.stdout.flush()
  os._exit(status)


def exit_with_error(error: BaseException) -> NoReturn:
  """Ends a command on an error whose message says what to do: one line, status 1.

  A process of a multi-process job exits at once (without JAX's shutdown, which would wait
  for the other processes that may still be running or gone).
  """
  print(f"Error: {error}", file=sys.stderr, flush=True)
  if jax.process_count() > 1:
    sys.stdout.flush()
    os._exit(1)
  sys.exit(1)
