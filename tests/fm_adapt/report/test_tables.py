"""Tests of results tables."""
import math

from fm_adapt.report import tables


def test_aggregate_mean_std_and_formats(tmp_path):
  groups = {"lora": [{"test/auc": 0.8, "trainable_params": 10}, {"test/auc": 0.9}],
            "full": [{"test/auc": float("nan")}], "probe": [{"test/auc": 0.7}]}
  rows = tables.aggregate(groups, ["test/auc"], extra=("trainable_params",))
  assert abs(rows[0]["test/auc"][0] - 0.85) < 1e-12
  assert abs(rows[0]["test/auc"][1] - 0.0707106781) < 1e-9  # Sample std of (0.8, 0.9).
  assert math.isnan(rows[1]["test/auc"][0])
  assert rows[2]["test/auc"][0] == 0.7 and math.isnan(rows[2]["test/auc"][1])  # One seed.
  md = tables.write_tables(tmp_path, rows, ["run", "seeds", "trainable_params", "test/auc"])
  assert "| lora | 2 | 10 | 0.850 ± 0.071 |" in md and "| full | 1 | None | n/a |" in md
  assert "| probe | 1 | None | 0.700 |" in md  # No ± for a single seed.
  assert (tmp_path / "results.csv").read_text().splitlines()[0] == (
      "run,seeds,trainable_params,test/auc_mean,test/auc_std")
  assert r"0.850 $\pm$ 0.071" in (tmp_path / "results.tex").read_text()
