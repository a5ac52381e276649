"""Tests of results tables."""
import math

import pytest

from fm_adapt.report import tables


def test_aggregate_mean_std_and_formats(tmp_path):
  groups = {"lora": [{"test/auc": 0.8, "trainable_params": 10}, {"test/auc": 0.9}],
            "full": [{"test/auc": float("nan")}], "probe": [{"test/auc": 0.7}]}
  rows = tables.aggregate(groups, ["test/auc"], extra=("trainable_params",))
  assert abs(rows[0]["test/auc"].mean - 0.85) < 1e-12
  assert abs(rows[0]["test/auc"].std - 0.0707106781) < 1e-9  # Sample std of (0.8, 0.9).
  assert math.isnan(rows[1]["test/auc"].mean)
  assert rows[2]["test/auc"].mean == 0.7 and math.isnan(rows[2]["test/auc"].std)  # One seed.
  md = tables.write_tables(tmp_path, rows, ["run", "seeds", "trainable_params", "test/auc"])
  assert "| lora | 2 | 10 | 0.850 ± 0.071 |" in md and "| full | 1 | None | n/a |" in md
  assert "| probe | 1 | None | 0.700 |" in md  # No ± for a single seed.
  csv_lines = (tmp_path / "results.csv").read_text().splitlines()
  assert csv_lines[0] == "run,seeds,trainable_params,test/auc_mean,test/auc_std,test/auc_n"
  assert csv_lines[1].startswith("lora,2,10,0.85") and csv_lines[1].endswith(",2")
  assert r"0.850 $\pm$ 0.071" in (tmp_path / "results.tex").read_text()


def test_an_undefined_metric_is_counted_never_averaged_away_silently():
  # A run whose split lacked a class reports auc None (JSON null): the cell says how many
  # seeds the mean is over instead of passing it off as a mean over all of them.
  groups = {"lora": [{"test/auc": 0.8}, {"test/auc": None}, {"test/auc": 0.9}]}
  rows = tables.aggregate(groups, ["test/auc"])
  assert rows[0]["test/auc"].n == 2 and rows[0]["test/auc"].runs == 3
  assert "| lora | 3 | 0.850 ± 0.071 (2 of 3 seeds) |" in tables.to_markdown(
      rows, ["run", "seeds", "test/auc"])
  assert "lora,3,0.85" in tables.to_csv(rows, ["run", "seeds", "test/auc"])


def test_study_columns_hold_balanced_accuracy_and_mcc_beside_acc_and_auc():
  assert tables.STUDY_METRICS[:4] == ("test/auc", "test/acc", "test/bal_acc", "test/mcc")
  runs = [{"test/auc": 0.9, "test/acc": 0.8, "test/bal_acc": 0.75, "test/mcc": 0.5,
           "val/auc": 0.91}]
  rows = tables.aggregate({"base": runs}, tables.STUDY_METRICS)
  md = tables.to_markdown(rows, ["run", *tables.STUDY_METRICS])
  assert md.splitlines()[0] == "| run | test/auc | test/acc | test/bal_acc | test/mcc | val/auc |"
  assert "| base | 0.900 | 0.800 | 0.750 | 0.500 | 0.910 |" in md


def test_ratio_to_a_reference_row():
  groups = {"full": [{"step_time_ms": 10.0}, {"step_time_ms": 14.0}],
            "lora": [{"step_time_ms": 6.0}], "old": [{"step_time_ms": None}]}
  rows = tables.ratio_to(tables.aggregate(groups, ["step_time_ms"]), "step_time_ms", "full",
                         "step_time_ratio")
  assert [r["step_time_ratio"] for r in rows[:2]] == [1.0, 0.5]
  assert math.isnan(rows[2]["step_time_ratio"])  # No step time: no ratio, never a 0.
  md = tables.to_markdown(rows, ["run", "step_time_ms", "step_time_ratio"])
  assert "| lora | 6.000 | 0.5 |" in md and "| old | n/a | n/a |" in md
  assert "lora,6.0,nan,1,0.5" in tables.to_csv(rows, ["run", "step_time_ms", "step_time_ratio"])
  with pytest.raises(KeyError, match=r"No run 'ful' .* runs: \['full', 'lora', 'old'\]"):
    tables.ratio_to(rows, "step_time_ms", "ful", "step_time_ratio")


def test_ratio_to_a_reference_without_the_metric_is_undefined():
  rows = tables.aggregate({"full": [{"t": None}], "lora": [{"t": 3.0}]}, ["t"])
  assert all(math.isnan(r["ratio"]) for r in tables.ratio_to(rows, "t", "full", "ratio"))


def test_float_cells_show_significant_digits():
  md = tables.to_markdown([{"run": "a", "label_fraction": 0.25, "r": 1.23456}],
                          ["run", "label_fraction", "r"])
  assert "| a | 0.25 | 1.23 |" in md
