"""Tests of the cost fields of a run (fm_adapt/train/costs.py and their place in the loop)."""
import json
import statistics

import pytest

from fm_adapt.train import costs
from fm_adapt.train import loop


class _Clock:
  """A clock that advances only when told."""

  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


def test_step_timer_times_consecutive_marks_and_skips_paused_intervals():
  clock = _Clock()
  timer = costs.StepTimer(clock)
  timer.done(1)  # The first step compiles: no earlier mark, not timed.
  clock.now += 0.5
  timer.done(2)
  timer.done(2)  # A step marked twice (checked late, then at once) counts once.
  clock.now += 0.25
  timer.done(3)
  timer.pause()  # Step 3 was evaluated: step 4's interval holds the evaluation.
  clock.now += 10.0
  timer.done(4)
  clock.now += 0.75
  timer.done(5)
  assert timer.durations == [0.5, 0.25, 0.75]
  assert timer.median() == 0.5


def test_step_timer_without_timed_steps_has_no_median():
  timer = costs.StepTimer(_Clock())
  timer.done(1)
  assert timer.median() is None and timer.durations == []


def test_run_costs_fields(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(costs, "_device_peak_bytes", lambda: None)  # A CPU backend.
  run = costs.RunCosts(clock)
  run.resumed_from_step = 3
  clock.now += 7.5
  fields = run.fields()
  assert fields["wall_time_s"] == 7.5 and fields["resumed_from_step"] == 3
  assert fields["step_time_s"] is None and fields["timed_steps"] == 0
  assert fields["peak_memory_source"] == "process_peak_rss" and fields["peak_memory_bytes"] > 0


def test_device_peak_is_preferred_and_flagged_when_it_did_not_grow(monkeypatch):
  peaks = iter([2_000, 5_000, 5_000, 5_000])  # Before run 1, after it, before run 2, after it.
  monkeypatch.setattr(costs, "_device_peak_bytes", lambda: next(peaks))
  first = costs.RunCosts().fields()
  assert first["peak_memory_source"] == "device_peak_bytes_in_use"
  assert first["peak_memory_bytes"] == 5_000 and first["peak_memory_upper_bound"] is False
  second = costs.RunCosts().fields()  # The peak of the first run: this one's is at most that.
  assert second["peak_memory_bytes"] == 5_000 and second["peak_memory_upper_bound"] is True


def test_results_json_holds_the_cost_fields(tmp_path, tiny_config, monkeypatch):
  durations = []
  original = costs.StepTimer.done

  def done(self, step):
    original(self, step)
    durations[:] = self.durations

  monkeypatch.setattr(costs.StepTimer, "done", done)
  # 4 steps, log_every=1, evaluated and saved at 2 and 4: step 1 compiles, step 3 follows an
  # evaluation, so steps 2 and 4 are timed.
  results = loop.train_and_evaluate(tiny_config(), tmp_path / "w")
  saved = json.loads((tmp_path / "w" / "results.json").read_text())
  for key in ("step_time_s", "timed_steps", "resumed_from_step", "wall_time_s",
              "peak_memory_bytes", "peak_memory_source", "peak_memory_upper_bound",
              "trainable_params", "total_params"):
    assert saved[key] == results[key], key
  assert saved["timed_steps"] == 2 == len(durations)
  assert saved["step_time_s"] == pytest.approx(statistics.median(durations))
  assert 0 < saved["step_time_s"] < saved["wall_time_s"]
  assert saved["resumed_from_step"] == 0
  assert saved["peak_memory_source"] == "process_peak_rss"  # CPU: no device allocator stats.
  assert saved["peak_memory_bytes"] > 10 * 2**20
