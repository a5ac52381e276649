"""experiments/medmnist_v2_table.py: the sweep over held official files, and the paper table."""
import pathlib

import pytest

from fm_adapt import study
from fm_adapt.report import tables

FILE = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "medmnist_v2_table.py"


def _load():
  return study.load_experiment(str(FILE))[0]  # A fresh import: nothing cached.


def _data_dir(tmp_path, names):
  (tmp_path / "medmnist").mkdir()
  for name in names:
    (tmp_path / "medmnist" / name).write_bytes(b"")
  return tmp_path


def test_sweep_covers_held_2d_files_models_and_seeds(tmp_path):
  data = _data_dir(tmp_path, ["breastmnist.npz", "retinamnist.npz", "retinamnist_64.npz",
                              "adrenalmnist3d.npz"])
  module = _load()
  runs = study.expand(module, f"data_dir={data},runlocal=True")
  assert [(r.name, r.seed) for r in runs] == [
      (f"{flag}_{model}", seed) for flag in ("breastmnist", "retinamnist")
      for model in ("resnet18_28", "resnet50_28") for seed in (0, 1, 2)]
  config = study.run_config(module, f"data_dir={data},runlocal=True", runs[4], tmp_path)
  assert dict(config.input.data) == {"name": "medmnist", "flag": "breastmnist", "size": 28}
  assert config.model.depth == 50 and config.seed == 1 and config.total_steps == 6


def test_bad_selection_and_empty_data_dir_are_errors(tmp_path):
  module = _load()
  data = _data_dir(tmp_path, ["breastmnist.npz"])
  with pytest.raises(ValueError, match=r"flags \['pathmnist'\] not available; valid: \['breastmnist'\]"):
    study.expand(module, f"data_dir={data},flags=pathmnist")
  with pytest.raises(ValueError, match=r"models \['resnet34_28'\]"):
    study.expand(module, f"data_dir={data},models=resnet34_28")
  empty = tmp_path / "empty"
  (empty / "medmnist").mkdir(parents=True)
  with pytest.raises(FileNotFoundError, match="no official 2D MedMNIST file"):
    study.expand(module, f"data_dir={empty}")


def test_report_puts_paper_numbers_beside_mean_and_std():
  groups = {"breastmnist_resnet18_28": [{"test/auc": .88, "test/acc": .80},
                                        {"test/auc": .90, "test/acc": .84}],
            "breastmnist_resnet50_28": [{"test/auc": .85, "test/acc": None}]}
  rows = tables.aggregate(groups, ["test/auc", "test/acc"])
  table = _load().report(rows)["medmnist_v2_table.md"]
  line = next(l for l in table.splitlines() if l.startswith("| breastmnist"))
  assert line == ("| breastmnist | 0.890 ± 0.014 | 0.901 | 0.820 ± 0.028 | 0.863 | 0.850 | 0.857 "
                  "| – | 0.812 |")


def test_runlocal_study_on_real_breastmnist(shared_data_dir, tmp_path):
  workdir = tmp_path / "table"
  study.run_study(f"{FILE}:runlocal=True,flags=breastmnist,models=resnet18_28,seeds=1,"
                  f"data_dir={shared_data_dir}", workdir, data_dir=str(shared_data_dir))
  result = (workdir / "breastmnist_resnet18_28-s0" / "results.json").read_text()
  assert '"test/auc"' in result
  table = (workdir / "medmnist_v2_table.md").read_text()
  line = next(l for l in table.splitlines() if l.startswith("| breastmnist"))
  cells = [c.strip() for c in line.strip("|").split("|")]
  assert cells[2] == "0.901" and cells[4] == "0.863" and cells[1] != "–"  # Ours beside the paper.
  assert "[medmnist_v2_table.md](medmnist_v2_table.md)" in (workdir / "index.md").read_text()
