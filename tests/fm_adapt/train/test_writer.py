"""metrics.jsonl holds each step once across a resume; undefined metrics are null."""
import json

from fm_adapt.train import writer as writer_lib


def test_resume_drops_the_rows_it_will_write_again(tmp_path, capsys):
  first = writer_lib.MetricWriter(tmp_path, tensorboard=False)
  for step in (1, 2, 3, 4):
    first.write(step, {"train/loss": 1.0 / step})
  first.write(4, {"best/test/auc": 0.9})
  with (tmp_path / "metrics.jsonl").open("a") as f:
    f.write('{"step": 5, "train/lo')  # A row cut short by a kill.
  resumed = writer_lib.MetricWriter(tmp_path, tensorboard=False, resume_step=2)
  assert "dropping unreadable line 6" in capsys.readouterr().err
  for step in (3, 4):
    resumed.write(step, {"train/loss": 1.0 / step, "val/auc": None})
  rows = writer_lib.read_metrics(tmp_path)
  assert [r["step"] for r in rows] == [1, 2, 3, 4]
  assert rows[-1]["val/auc"] is None and not any("best/test/auc" in r for r in rows)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]  # No temp file left.


def test_non_finite_values_stay_valid_json(tmp_path):
  writer_lib.MetricWriter(tmp_path, tensorboard=False).write(1, {"train/loss": float("nan")})
  row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=lambda c: 1 / 0)
  assert row == {"step": 1, "train/loss": "nan"}
