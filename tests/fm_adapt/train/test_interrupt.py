"""Signals during training become stop requests; a second Ctrl-C stops at once."""
import os
import pathlib
import signal

import pytest

from fm_adapt.train import interrupt


def test_signal_becomes_a_request_and_handlers_are_restored():
  before = signal.getsignal(signal.SIGTERM)
  with interrupt.StopOnSignal() as stop:
    assert stop.signum is None
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == signal.SIGTERM
  assert signal.getsignal(signal.SIGTERM) is before


def test_second_ctrl_c_raises_at_once():
  with interrupt.StopOnSignal() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGINT
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)


def test_stopped_exit_status():
  assert interrupt.Stopped(7, signal.SIGTERM).exit_status == 143
  assert interrupt.Stopped(7, signal.SIGINT).exit_status == 130


def test_exit_with_resume_hint(monkeypatch, capsys):
  statuses = []
  monkeypatch.setattr(interrupt.os, "_exit", statuses.append)
  interrupt.exit_with_resume_hint(interrupt.Stopped(7, signal.SIGTERM), "w")
  interrupt.exit_with_resume_hint(KeyboardInterrupt(), "w")
  err = capsys.readouterr().err
  assert statuses == [143, 130]
  assert "Stopped at step 7; its checkpoint is in w: run the same command" in err
  assert "Interrupted. Checkpoints are in w; run the same command" in err


def test_exit_with_resume_hint_of_a_stopped_download(monkeypatch, capsys):
  """A SIGTERM during a download exits 143 with the download's own message, not a checkpoint hint."""
  from data_pipelines import download
  statuses = []
  monkeypatch.setattr(interrupt.os, "_exit", statuses.append)
  error = download.Interrupted("http://127.0.0.1/x.npz", pathlib.Path("d/x.npz"), signal.SIGTERM)
  interrupt.exit_with_resume_hint(error, "w")
  err = capsys.readouterr().err
  assert statuses == [143]
  assert "Download of http://127.0.0.1/x.npz to d/x.npz stopped by SIGTERM" in err
  assert "Checkpoints" not in err
