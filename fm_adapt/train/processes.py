"""Multi-process start-up on JAX's own runtime: join the job, say the topology.

A run on several hosts (a pod, a SLURM job, or several local processes) is one JAX process
per host joined by `jax.distributed.initialize`; collectives are XLA's (gloo on CPU). The join
is explicit (coordinator address, number of processes, process id: flags or the environment
variables JAX_COORDINATOR_ADDRESS, FM_ADAPT_NUM_PROCESSES, FM_ADAPT_PROCESS_ID) or left to
JAX's cluster detection (`multihost`: SLURM, Cloud TPU pods; FM_ADAPT_MULTIHOST=1).
"""
from __future__ import annotations

import os
import socket
import sys
import time

import jax

DEFAULT_TIMEOUT_S = 300


class JoinError(RuntimeError):
  """This process could not join the multi-process job."""


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise JoinError(f"{name}={value!r} is not an integer.") from None


def start(multihost: bool = False, coordinator_address: str | None = None,
          num_processes: int | None = None, process_id: int | None = None,
          timeout_s: int = DEFAULT_TIMEOUT_S) -> None:
  """Joins the multi-process job when asked to (once per process), then logs the topology.

  Args:
    multihost: let JAX detect the cluster (SLURM, Cloud TPU) for what is not given.
    coordinator_address: 'host:port' of process 0 (default $JAX_COORDINATOR_ADDRESS).
    num_processes: processes in the job (default $FM_ADAPT_NUM_PROCESSES).
    process_id: this process's index (default $FM_ADAPT_PROCESS_ID).
    timeout_s: how long to wait for every process to join.

  Raises:
    JoinError: a partial explicit join (naming what is missing), or a join that failed or timed
      out (naming the coordinator address and the timeout).
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  num_processes = _env_int("FM_ADAPT_NUM_PROCESSES") if num_processes is None else num_processes
  process_id = _env_int("FM_ADAPT_PROCESS_ID") if process_id is None else process_id
  multihost = multihost or os.environ.get("FM_ADAPT_MULTIHOST") == "1"
  given = {"coordinator_address": coordinator_address, "num_processes": num_processes,
           "process_id": process_id}
  if jax.distributed.is_initialized() or not (multihost or any(
      v is not None for v in given.values())):
    return
  missing = [k for k, v in given.items() if v is None]
  if missing and not multihost:
    raise JoinError(
        f"A multi-process run needs all of --coordinator_address, --num_processes and "
        f"--process_id; {', '.join('--' + m for m in missing)} missing. Give them, or "
        "--multihost on a cluster JAX detects (SLURM, Cloud TPU).")
  where = coordinator_address or "the address JAX detects from the cluster"
  print(f"fm_adapt: process {'?' if process_id is None else process_id} of "
        f"{'?' if num_processes is None else num_processes} joining coordinator {where} "
        f"(waiting up to {timeout_s} s)", file=sys.stderr, flush=True)
  if coordinator_address and process_id:  # JAX aborts the process on a failed join: check first.
    _wait_for_coordinator(coordinator_address, timeout_s, process_id, num_processes)
  try:
    jax.distributed.initialize(coordinator_address, num_processes, process_id,
                               initialization_timeout=timeout_s)
  except Exception as e:  # pylint: disable=broad-except  # Name what was waited for.
    raise JoinError(_join_failure(process_id, num_processes, where, timeout_s, e)) from e
  print(topology(), file=sys.stderr, flush=True)


def _join_failure(process_id: int | None, num_processes: int | None, where: str, timeout_s: int,
                  cause: BaseException | str) -> str:
  if isinstance(cause, BaseException):
    cause = f"{type(cause).__name__}: {str(cause).splitlines()[0][:300] if str(cause) else ''}"
  return (f"Process {'?' if process_id is None else process_id} could not join the job of "
          f"{'?' if num_processes is None else num_processes} processes at coordinator {where} "
          f"within {timeout_s} s ({cause}). Check that every process was started with the same "
          "coordinator address and process count, that process 0 runs and its port is reachable.")


def _wait_for_coordinator(address: str, timeout_s: int, process_id: int,
                          num_processes: int | None) -> None:
  """Waits until the coordinator's port accepts a connection; JoinError after `timeout_s`."""
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise JoinError(f"--coordinator_address={address!r} is not host:port.")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host.strip("[]"), int(port)), timeout=5):
        return
    except OSError as e:
      if time.monotonic() >= deadline:
        raise JoinError(_join_failure(process_id, num_processes, address, timeout_s,
                                      f"nothing accepted a connection: {e}")) from None
      time.sleep(0.5)


def topology() -> str:
  """One line: this process, the process count, local and global devices, platform."""
  return (f"fm_adapt: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local / {jax.device_count()} global "
          f"{jax.devices()[0].platform} devices")
