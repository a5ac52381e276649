"""Whole-or-nothing writes: strict JSON, the temp file fsynced before the rename, removed on error."""
import json
import math
import os

import numpy as np
import pytest

from fm_adapt.train import files


def test_non_finite_values_are_written_as_null(tmp_path):
  path = tmp_path / "results.json"
  files.write_json(path, {"auc": float("nan"), "loss": np.float32("inf"), "acc": np.float32(0.5),
                          "n": np.int64(3), "per_class": np.array([1.0, np.nan])})
  text = path.read_text()
  assert "NaN" not in text and "Infinity" not in text
  loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}"))
  assert loaded == {"auc": None, "loss": None, "acc": 0.5, "n": 3, "per_class": [1.0, None]}


def test_temp_file_is_fsynced_before_the_rename(tmp_path, monkeypatch):
  events = []
  fsync, replace = os.fsync, os.replace
  monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), fsync(fd))[1])
  monkeypatch.setattr(os, "replace", lambda a, b: (events.append("replace"), replace(a, b))[1])
  files.write_text(tmp_path / "a.txt", "x")
  assert events[:2] == ["fsync", "replace"]
  assert (tmp_path / "a.txt").read_text() == "x"


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, monkeypatch):
  path = tmp_path / "config.json"
  files.write_json(path, {"lr": 1e-3})

  def fail(fd):
    raise OSError("disk full")

  monkeypatch.setattr(os, "fsync", fail)
  with pytest.raises(OSError, match="disk full"):
    files.write_json(path, {"lr": 1.0})
  assert json.loads(path.read_text()) == {"lr": 1e-3}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_jsonable_keeps_plain_values():
  assert files.jsonable({"a": (1, "b", None, True), "c": math.pi}) == {
      "a": [1, "b", None, True], "c": math.pi}
