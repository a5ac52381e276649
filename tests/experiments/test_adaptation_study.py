"""experiments/adaptation_study.py: the plan it sweeps, its arguments, its report, and (with the
real MedMNIST files and weights) a runlocal study end to end."""
import json
import math
import pathlib

import pytest

from fm_adapt import study
from fm_adapt.report import tables

FILE = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "adaptation_study.py"


def _load():
  return study.load_experiment(str(FILE))[0]  # A fresh import: nothing cached.


def test_full_plan_is_strategy_x_fraction_x_dataset_x_seed():
  module = _load()
  runs = study.expand(module, "vit_init=mim.npz")
  # ViT: 7 strategies, CNN: 5 (no VPT), 3 fractions, 3 datasets, 3 seeds.
  assert len(runs) == (7 + 5) * 3 * 3 * 3
  names = {r.name for r in runs}
  assert "retinamnist_vit_vpt_deep_10_f0.01" in names and "breastmnist_cnn_full_f1" in names
  assert not any("cnn_vpt" in n for n in names)
  # Every strategy of a dataset and fraction trains on the same subset: only the seed decides it.
  fractions = {(r.name.rsplit("_f", 1)[1], r.overrides["input.label_fraction"]) for r in runs}
  assert fractions == {("0.01", 0.01), ("0.1", 0.1), ("1", 1.0)}
  pneumonia = [r for r in runs if r.name.startswith("pneumoniamnist_vit_bitfit")]
  assert sorted(r.overrides["total_steps"] for r in pneumonia if r.seed == 0) == [50, 80, 740]  # 10 passes over 1 %, 10 %, all
  vit = next(r for r in runs if r.name.startswith("breastmnist_vit"))
  assert vit.overrides["model_init"] == "mim.npz"
  assert vit.overrides["input.pp"] == "gray_to_rgb|value_range(-1,1)"  # MIM exports are RGB.


def test_the_vit_rows_adapt_the_foundation_model_by_default():
  from fm_adapt import foundation  # pylint: disable=import-outside-toplevel
  runs = study.expand(_load(), "backbones=vit,datasets=breastmnist,seeds=1")
  assert len(runs) == 7 * 3
  for run in runs:
    assert run.overrides["model_init"] == str(foundation.FILE)
    assert run.overrides["model"] == foundation.MODEL
    assert run.overrides["input.pp"] == foundation.PP
    assert run.overrides["model_load"] == {"dont_load": ["head/.*"]}


def test_arguments_are_checked():
  module = _load()
  with pytest.raises(ValueError, match=r"Unknown strategies \['lora'\]; valid: .*'lora_qv_r8'"):
    module.parse("backbones=vit,strategies=lora,vit_init=x")
  with pytest.raises(ValueError, match=r"fractions \[0.0\] must be in \(0, 1\]"):
    module.parse("backbones=cnn,fractions=0")
  with pytest.raises(ValueError, match="vit_init=scratch: the ViT rows adapt a pretrained"):
    module.parse("backbones=vit,vit_init=scratch")
  assert module.parse("backbones=vit,vit_init=scratch,runlocal=True").vit_init == "scratch"
  with pytest.raises(ValueError, match=r"Unknown datasets \['chest'\]"):
    module.parse("backbones=cnn,datasets=chest")


def test_steps_cover_epochs_of_the_subset_with_a_floor():
  module = _load()
  assert module.total_steps("breastmnist", 0.01, 10, 50) == 50  # 6 examples: 1 batch/epoch.
  assert module.total_steps("pneumoniamnist", 1.0, 10, 50) == 740  # 4708 / 64 -> 74 a pass.


def test_max_steps_caps_every_run_and_eval_batch_reaches_the_config():
  module = _load()
  assert module.total_steps("pneumoniamnist", 1.0, 10, 50, 170) == 170
  assert module.total_steps("breastmnist", 1.0, 10, 50, 170) == 90  # Under the cap: unchanged.
  runs = study.expand(module, "backbones=cnn,datasets=pneumoniamnist,seeds=1,max_steps=170")
  assert sorted(r.overrides["total_steps"] for r in runs if "_bitfit_" in r.name) == [50, 80, 170]
  assert module.get_config("backbones=cnn,eval_batch=32").input.eval_batch_size == 32
  assert module.get_config("backbones=cnn").input.eval_batch_size == 64
  with pytest.raises(ValueError, match="max_steps=20 is below min_steps=50"):
    module.parse("backbones=cnn,max_steps=20")


def test_reference_is_full_fine_tuning_of_the_same_dataset_backbone_and_fraction():
  module = _load()
  assert module.reference_of("breastmnist_cnn_lora_1x1_r8_f0.1") == "breastmnist_cnn_full_f0.1"
  assert module.reference_of("retinamnist_vit_full_f1") == "retinamnist_vit_full_f1"
  assert module.reference_of("something_else") is None


def _result(auc, ece, clean, severities):
  metrics = {"test/auc": auc, "test/acc": .8, "test/bal_acc": .7, "calib/ece": ece,
             "calib/ece_ts": ece / 2, "robust/clean/bal_acc": clean,
             "robust/corrupted_mean/bal_acc": sum(severities) / len(severities)}
  for s, value in enumerate(severities, 1):
    metrics[f"robust/jpeg/{s}/bal_acc"] = value
    metrics[f"robust/pixelate/{s}/bal_acc"] = value - 0.1
  return metrics


def test_report_tables_and_pictures():
  module = _load()
  groups = {
      "breastmnist_vit_full_f1": [_result(.9, .1, .8, [.8, .7, .6, .5, .4]),
                                  _result(.8, .2, .8, [.8, .7, .6, .5, .4])],
      "breastmnist_vit_bitfit_f1": [_result(.85, .05, .7, [.7, .6, .5, .4, .3])],
      "breastmnist_vit_bitfit_f0.1": [_result(.7, .05, .6, [.6, .5, .4, .3, .2])],
  }
  flat = {k: [dict(m, trainable_params=1000 if "bitfit" in k else 10**6) for m in v]
          for k, v in groups.items()}
  rows = tables.aggregate(flat, list(module.METRICS), extra=("trainable_params",))
  results = {k: [{"metrics": m} for m in v] for k, v in groups.items()}
  files = module.report(rows, results)
  assert sorted(files) == ["adaptation_table.md", "plots/auc_vs_params_breastmnist_vit_f0.1.png",
                           "plots/auc_vs_params_breastmnist_vit_f1.png",
                           "plots/label_efficiency_breastmnist_vit.png",
                           "plots/robustness_breastmnist_vit.png"]
  table = files["adaptation_table.md"]
  assert "| full | 1 | 2 | 1,000,000 | 0.850 ± 0.071 |" in table  # 2 seeds.
  assert "| bitfit | 1 | 1 | 1,000 | 0.850 |" in table
  assert "0.800 → 0.600" in table  # Clean -> mean corrupted, full fine-tuning.
  assert "| MedMNIST-C AlexNet (224 px, paper) | 1 |" in table and "0.855 → 0.701" in table
  assert all(v.startswith(b"\x89PNG") for k, v in files.items() if k.endswith(".png"))
  # The answer, computed: best test AUC per fraction (at 1, full's .85 ties bitfit's and is
  # kept by name), the most robust strategy and the smallest drop (.2 for both, within float).
  assert "| vit | 0.1 | bitfit 0.700 | bitfit 1 |" in table
  assert "| vit | 1 | full 0.850 | full 1 |" in table
  assert ("| vit | breastmnist | full 0.800 → 0.600 | bitfit 0.700 → 0.500 |" in table)
  # Robustness per severity: the mean over corruptions, then over seeds.
  curve = module._severity_curve(results["breastmnist_vit_full_f1"])
  assert [round(p[1], 3) for p in curve] == [.75, .65, .55, .45, .35]


def test_runlocal_study_on_real_breastmnist(shared_data_dir, shared_weights_dir, tmp_path,
                                            monkeypatch):
  monkeypatch.setenv("FM_ADAPT_WEIGHTS_DIR", str(shared_weights_dir))
  workdir = tmp_path / "study"
  study.run_study(f"{FILE}:runlocal=True,datasets=breastmnist,strategies=linear_probe+full,"
                  "fractions=0.1", workdir, data_dir=str(shared_data_dir),
                  only=r"vit_|cnn_linear_probe")
  result = json.loads((workdir / "breastmnist_vit_linear_probe_f0.1-s0" / "results.json")
                      .read_text())
  assert result["label_fraction"] == 0.1 and result["num_train_examples"] == 55
  for key in ("test/auc", "calib/ece", "calib/ece_ts", "robust/clean/bal_acc",
              "robust/corrupted_mean/bal_acc", "robust/jpeg/5/bal_acc"):
    assert result["metrics"][key] is not None, key
  assert (workdir / "breastmnist_vit_linear_probe_f0.1-s0" / "predictions" /
          "calib_reliability.png").exists()
  table = (workdir / "adaptation_table.md").read_text()
  assert "### breastmnist, vit" in table and "### breastmnist, cnn" in table
  ratio = [l for l in (workdir / "results.md").read_text().splitlines()
           if l.startswith("| breastmnist_vit_linear_probe_f0.1 ")][0]
  assert "n/a" not in ratio.split("|")[17], ratio  # step_time_ratio against vit full.
  assert (workdir / "plots" / "robustness_breastmnist_cnn.png").exists()
  assert "[adaptation_table.md](adaptation_table.md)" in (workdir / "index.md").read_text()
  assert not math.isnan(result["step_time_s"])
