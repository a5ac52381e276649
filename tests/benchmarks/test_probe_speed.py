"""benchmarks/probe_speed.py: its smoke run on synthetic data measures both sides."""
import json

import pytest

from benchmarks import probe_speed


def test_quick_run_times_both_sides_and_writes_the_result(tmp_path, monkeypatch):
  monkeypatch.delenv("FM_ADAPT_DATA_DIR", raising=False)
  record = probe_speed.main(["--quick", "--out", str(tmp_path)])
  assert record["data"].startswith("synthetic") and record["train_examples"] == 64
  assert record["steps_per_epoch"] == 4  # 64 examples in batches of 16.
  assert record["e2e_step_s"]["n"] == 2 and record["cached_epoch_s"]["n"] == 2
  assert record["e2e_epoch_s"] > 0 and record["cached_epoch_s"]["median"] > 0
  assert record["speedup_per_epoch"] == pytest.approx(
      record["e2e_epoch_s"] / record["cached_epoch_s"]["median"])
  assert json.loads((tmp_path / "probe_speed.json").read_text())["batch"] == 16
  assert "speed-up per epoch" in (tmp_path / "probe_speed.md").read_text()


def test_synthetic_sizes_are_checked(capsys):
  with pytest.raises(SystemExit):
    probe_speed.parse_args(["--synthetic-sizes", "10,5"])
  assert "expected three positive sizes" in capsys.readouterr().err
