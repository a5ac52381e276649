"""Joining a multi-process job: a partial join is refused, a failed join names what it waited for."""
import pathlib
import subprocess
import sys

import pytest

from fm_adapt.train import processes

REPO = pathlib.Path(__file__).resolve().parents[3]


def test_one_process_does_not_join(monkeypatch):
  for name in ("JAX_COORDINATOR_ADDRESS", "FM_ADAPT_NUM_PROCESSES", "FM_ADAPT_PROCESS_ID",
               "FM_ADAPT_MULTIHOST"):
    monkeypatch.delenv(name, raising=False)
  processes.start()  # Nothing asked: a plain one-process run.
  assert "process 0 of 1" in processes.topology()


def test_a_partial_join_names_what_is_missing(monkeypatch):
  monkeypatch.delenv("FM_ADAPT_PROCESS_ID", raising=False)
  monkeypatch.setenv("FM_ADAPT_NUM_PROCESSES", "2")
  with pytest.raises(processes.JoinError, match="--coordinator_address, --process_id missing"):
    processes.start()


def test_a_bad_environment_value_is_named(monkeypatch):
  monkeypatch.setenv("FM_ADAPT_NUM_PROCESSES", "two")
  with pytest.raises(processes.JoinError, match="FM_ADAPT_NUM_PROCESSES='two' is not an integer"):
    processes.start()


def test_a_join_that_times_out_names_the_coordinator_and_the_timeout(tmp_path, tiny_experiment,
                                                                      tiny_env):
  """Process 1 of 2 with no process 0: the command ends with one clear line, no traceback."""
  out = subprocess.run(
      [sys.executable, "-m", "fm_adapt.main", "--config", str(tiny_experiment()), "--workdir",
       str(tmp_path / "w"), "--coordinator_address=127.0.0.1:9", "--num_processes=2",
       "--process_id=1", "--initialization_timeout=3"],
      cwd=REPO, env=tiny_env, capture_output=True, text=True, timeout=300)
  assert out.returncode == 1, out.stderr[-3000:]
  assert ("Process 1 could not join the job of 2 processes at coordinator 127.0.0.1:9 within 3 s"
          in out.stderr), out.stderr[-3000:]
  assert "Traceback" not in out.stderr
