"""One process of a multi-process job prepares a dataset while the others wait for it.

Processes that build one TFDS copy at once race: each renames its own `incomplete.*` folder onto
the same version folder, and all but the first fail (`FileExistsError`). In a job joined by
`jax.distributed`, process 0 prepares and posts the outcome (done, where; or its error) in JAX's
coordination service; every other process waits for that post, up to a timeout
($FM_ADAPT_DATA_PREPARE_TIMEOUT_S, default 3600 s), and then reads the copy itself. A process
that is not part of such a job (one process) just prepares.

Why the coordination service's key-value store: `jax.experimental.multihost_utils.
sync_global_devices` is a device collective without a timeout (a stalled process 0 would hang
the others silently) that carries no message, and orbax's `multihost.sync_global_processes`
uses it too unless an orbax flag is set. `blocking_key_value_get(key, timeout)` of the
coordination-service client is a barrier with a timeout for the waiting processes and, in the
same call, the channel of process 0's outcome, so a failure there is reported everywhere instead
of as a timeout. JAX has no public accessor of that client; `_client` reads it where
orbax's `get_jax_distributed_client` does (`jax._src.distributed.global_state`), in one place.
"""
from __future__ import annotations

import os
from collections.abc import Callable

import jax

TIMEOUT_ENV = 'FM_ADAPT_DATA_PREPARE_TIMEOUT_S'
DEFAULT_TIMEOUT_S = 3600.0
_KEY_PREFIX = 'data_pipelines/prepared/'
_DONE, _FAILED = 'done', 'failed'


class PrepareTimeoutError(TimeoutError):
  """Process 0 did not say, within the timeout, that it prepared the dataset."""


class PrepareFailedError(RuntimeError):
  """Process 0 failed to prepare the dataset."""


def timeout_s() -> float:
  """How long processes other than 0 wait for a dataset: $FM_ADAPT_DATA_PREPARE_TIMEOUT_S."""
  value = os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S
  try:
    seconds = float(value)
  except ValueError:
    raise ValueError(f'{TIMEOUT_ENV}={value!r} is not a number of seconds.') from None
  if seconds <= 0:
    raise ValueError(f'{TIMEOUT_ENV}={value!r} must be a positive number of seconds.')
  return seconds


def _job() -> tuple[object, int, int] | None:
  """(coordination client, this process's id, process count) of a multi-process job, or None."""
  if not jax.distributed.is_initialized():
    return None
  from jax._src import distributed  # pylint: disable=g-import-not-at-top  # See the docstring.
  state = distributed.global_state
  if state.client is None or (state.num_processes or 1) == 1:
    return None
  return state.client, state.process_id, state.num_processes


def prepare_once(prepare: Callable[[], None], dataset: str, directory: str) -> str:
  """Runs `prepare` on process 0 only; the others wait until it is done.

  Call it from every process of the job, for the same datasets (in any order).

  Args:
    prepare: builds the dataset unless it is built already.
    dataset: the dataset's name (name/config/version): the key of the post, and the errors'.
    directory: where this process reads the dataset (named in the errors).

  Returns:
    Where process 0 prepared the dataset (this process's `directory` on process 0 and alone).

  Raises:
    PrepareTimeoutError: on processes other than 0, when process 0 posted nothing within
      `timeout_s()` seconds (naming the dataset, the directory and the timeout).
    PrepareFailedError: on processes other than 0, when `prepare` failed on process 0.
  """
  job = _job()
  if job is None:
    prepare()
    return directory
  client, process_id, num_processes = job
  key = _KEY_PREFIX + dataset
  if process_id == 0:
    try:
      prepare()
    except BaseException as error:
      client.key_value_set(key, f'{_FAILED}\n{type(error).__name__}: {error}',
                           allow_overwrite=True)
      raise
    client.key_value_set(key, f'{_DONE}\n{directory}', allow_overwrite=True)
    return directory
  seconds = timeout_s()
  try:
    post = client.blocking_key_value_get(key, int(seconds * 1000))
  except jax.errors.JaxRuntimeError as error:
    raise PrepareTimeoutError(
        f'Process {process_id} of {num_processes} waited {seconds:g} s for process 0 to '
        f'prepare the dataset {dataset} (read here from {directory}), and process 0 did not '
        f'say it was done ({str(error).splitlines()[0][:200]}). Process 0 may still be '
        f'building it (give more time: {TIMEOUT_ENV}=<seconds>), have failed (see its log), or '
        'use another dataset config than this process.') from error
  status, detail = post.split('\n', 1)
  if status != _DONE:
    raise PrepareFailedError(f'Process 0 failed to prepare the dataset {dataset} that process '
                             f'{process_id} waited for (to read from {directory}): {detail}')
  return detail
