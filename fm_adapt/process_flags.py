"""Command-line flags that join a multi-process job (shared by `fm_adapt.main` and `.study`).

  python -m fm_adapt.main ... --multihost                  # SLURM, Cloud TPU: JAX detects the job
  python -m fm_adapt.main ... --coordinator_address 10.0.0.1:12355 --num_processes 2 --process_id 0
"""
from __future__ import annotations

from absl import flags

from fm_adapt.train import processes

_MULTIHOST = flags.DEFINE_bool(
    "multihost", False, "Join a multi-process job that JAX detects (SLURM, Cloud TPU pods).")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 (default $JAX_COORDINATOR_ADDRESS).")
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in the job (default $FM_ADAPT_NUM_PROCESSES).")
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index, 0..num_processes-1 (default $FM_ADAPT_PROCESS_ID).")
_TIMEOUT = flags.DEFINE_integer(
    "initialization_timeout", processes.DEFAULT_TIMEOUT_S,
    "Seconds to wait for every process to join.")


def start_from_flags() -> None:
  """Joins the job the flags (or the environment) describe; does nothing for one process."""
  processes.start(multihost=_MULTIHOST.value, coordinator_address=_COORDINATOR.value,
                  num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value,
                  timeout_s=_TIMEOUT.value)
