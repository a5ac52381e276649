"""experiments/fm_transfer.py: the plan (pretraining runs first, then initialisation x strategy
x dataset x seed), arguments, the report on fake rows, and (with the real MedMNIST files) a
runlocal study that pretrains, adapts the export and writes the table and picture."""
import io
import json
import math
import pathlib

import numpy as np
import pytest
from PIL import Image

from fm_adapt import foundation
from fm_adapt import study
from fm_adapt.report import tables

FILE = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "fm_transfer.py"
PRETRAIN = FILE.with_name("mim_pretrain.py")


def _load(path=FILE):
  return study.load_experiment(str(path))[0]  # A fresh import: nothing cached.


def test_full_plan_pretrains_each_objective_then_adapts_every_init(tmp_path):
  module = _load()
  runs = study.expand(module, None)
  assert len(runs) == 4 + 6 * 3 * 3 * 3
  assert [(r.name, r.seed) for r in runs[:4]] == [
      ("pretrain_simmim", 0), ("pretrain_mae", 0), ("pretrain_frequency", 0),
      ("pretrain_deblur", 0)]
  names = {r.name for r in runs[4:]}
  assert len(names) == 54 and "retinamnist_deblur_lora_qv_r8" in names
  by = {(r.name, r.seed): r.overrides for r in runs}
  assert by["breastmnist_foundation_full", 1]["model_init"] == str(foundation.FILE)
  assert "model" not in by["breastmnist_foundation_full", 1]  # Ti/4 already.
  assert by["breastmnist_mae_full", 2]["model_init"] == "run:pretrain_mae"
  assert "model_init" not in by["breastmnist_scratch_full", 0]
  assert by["breastmnist_scratch_linear_probe", 1]["probe"] == "auto"
  assert by["pneumoniamnist_scratch_lora_qv_r8", 0]["adapt"][0]["rank"] == 8
  steps = {flag: by[f"{flag}_scratch_full", 0]["total_steps"]
           for flag in ("pneumoniamnist", "breastmnist", "retinamnist")}
  assert steps == {"pneumoniamnist": 370, "breastmnist": 50, "retinamnist": 90}
  assert by["retinamnist_scratch_full", 0]["input.pp"] == "value_range(-1,1)"
  assert by["breastmnist_scratch_full", 0]["input.pp"] == "gray_to_rgb|value_range(-1,1)"


def test_a_pretraining_run_is_mim_pretrain_with_the_studys_budget(tmp_path):
  module = _load()
  arg = "pretrain_steps=300,pretrain_batch=64"
  run = study.expand(module, arg)[1]
  assert run.name == "pretrain_mae"
  config = study.run_config(module, arg, run, tmp_path, resolve_runs=False).to_dict()
  want = _load(PRETRAIN).get_config("objective=mae,steps=300,batch=64,blr=0.001,size=28,"
                                     "channels=3")
  assert want.lr == 1e-3 * 64 / 256  # The foundation model's base learning rate.
  want = dict(want.to_dict(), progress=False)  # The study's progress setting.
  assert config == want
  # The adaptation runs build the classification ViT of the pretrained encoder.
  adapt = study.run_config(module, arg, study.expand(module, arg)[10], tmp_path,
                           resolve_runs=False)
  assert dict(adapt.model) == {"variant": "Ti/4", "pool_type": "gap"}
  assert adapt.model_name == "vit" and adapt.best_metric == "val/auc"


def test_config_overrides_change_nested_keys_or_whole_entries():
  module = _load()
  base = {"a": 1, "input": {"pp": "x", "batch_size": 8}, "evals": {"val": 1, "test": 2},
          "loss": {"name": "xent"}}
  target = {"a": 1, "input": {"pp": "y", "batch_size": 8, "last_batch": "carry"},
            "evals": {"recon": 3}, "loss": {"name": "mae", "mask": None}}
  assert module.config_overrides(base, target) == {
      "input.pp": "y", "input.last_batch": "carry", "evals": {"recon": 3}, "loss.name": "mae"}
  with pytest.raises(ValueError, match=r"lacks keys \['z'\]"):
    module.config_overrides(dict(base, z=0), target)


def test_subsets_and_arguments():
  module = _load()
  runs = study.expand(module, "inits=scratch+mae,strategies=full,datasets=breastmnist,seeds=2")
  assert [(r.name, r.seed) for r in runs] == [
      ("pretrain_mae", 0), ("breastmnist_scratch_full", 0), ("breastmnist_mae_full", 0),
      ("breastmnist_scratch_full", 1), ("breastmnist_mae_full", 1)]
  assert [r.name for r in study.expand(module, "inits=scratch,datasets=retinamnist,seeds=1")] == [
      "retinamnist_scratch_linear_probe", "retinamnist_scratch_lora_qv_r8",
      "retinamnist_scratch_full"]
  for arg, message in (("inits=imagenet", r"inits='imagenet'.*\(unknown: \['imagenet'\]\)"),
                       ("datasets=chestmnist", r"datasets='chestmnist'"),
                       ("strategies=lora", r"strategies='lora'"),
                       ("inits=mae+mae", r"inits='mae\+mae': give distinct names"),
                       ("seeds=0", r"seeds=0 must be a positive int"),
                       ("pretrain_steps=-5", r"pretrain_steps=-5 must be a positive int"),
                       ("epochs=0", r"epochs=0(\.0)? must be a positive float"),
                       ("foo=1", r"Unknown config argument 'foo'")):
    with pytest.raises(ValueError, match=message):
      module.parse(arg)


def test_reference_is_full_fine_tuning_of_the_same_dataset_and_init():
  module = _load()
  assert module.reference_of("breastmnist_mae_lora_qv_r8") == "breastmnist_mae_full"
  assert module.reference_of("pretrain_mae") is None
  assert module.parse_name("retinamnist_scratch_linear_probe") == {
      "flag": "retinamnist", "init": "scratch", "strategy": "linear_probe"}


def test_report_table_reference_rows_and_picture():
  module = _load()
  groups = {
      "breastmnist_scratch_full": [{"test/auc": .80, "test/acc": .75, "trainable_params": 5e6},
                                   {"test/auc": .84, "test/acc": .79, "trainable_params": 5e6}],
      "breastmnist_mae_linear_probe": [{"test/auc": .85, "test/acc": .80,
                                        "trainable_params": 386}],
      "retinamnist_mae_full": [{"test/auc": .70, "test/acc": None, "trainable_params": 5e6}],
      "pretrain_mae": [{"recon/loss": .123, "wall_time_s": 654.3}],
  }
  rows = tables.aggregate(groups, [*module.METRICS, "wall_time_s"], extra=("trainable_params",))
  results = {"pretrain_mae": [{"total_steps": 2000, "metrics": {"recon/loss": .123}}]}
  files = module.report(rows, results)
  assert sorted(files) == ["fm_transfer_table.md", "plots/fm_transfer_auc.png"]
  table = files["fm_transfer_table.md"]
  breast = table.split("### breastmnist")[1].split("###")[0]
  lines = [l for l in breast.splitlines() if l.startswith("| ")]
  # Ours in init then strategy order, then the published rows.
  assert lines[1] == "| scratch | full | 0.820 ± 0.028 | 0.770 ± 0.028 | 5,000,000 | 2 |"
  assert lines[2] == "| mae | linear_probe | 0.850 | 0.800 | 386 | 1 |"
  assert lines[3].startswith("| MedMNIST+ DINO ViT linear probe") and "| 0.868 | – |" in lines[3]
  assert "| 0.876 | – |" in lines[4] and "| 0.901 | 0.863 |" in lines[5]
  retina = table.split("### retinamnist")[1].split("###")[0]
  assert "| mae | full | 0.700 | – |" in retina and "| 0.720 | – |" in retina
  assert "| pretrain_mae | 2000 | 0.123 | 654 |" in table
  assert "pneumoniamnist" not in table
  goals = table.split("### Goals")[1].split("###")[0]
  assert ("| breastmnist | mae | linear_probe 0.850 | 0.820 | +0.030 | 0.868 | -0.018 |"
          in goals)
  assert "retinamnist" not in goals  # No parameter-efficient run there.
  image = np.asarray(Image.open(io.BytesIO(files["plots/fm_transfer_auc.png"])))
  assert image.shape[1] > image.shape[0]  # Two panels side by side.


def test_runlocal_study_pretrains_and_adapts_the_export(shared_data_dir, tmp_path):
  workdir = tmp_path / "study"
  study.run_study(f"{FILE}:runlocal=True,datasets=breastmnist,inits=scratch+simmim,"
                  "strategies=linear_probe+lora_qv_r8", workdir, data_dir=str(shared_data_dir),
                  only=r"pretrain_simmim|breastmnist_simmim")
  pretrain = workdir / "pretrain_simmim-s0"
  assert (pretrain / "reconstructions" / "final.png").exists()
  assert (pretrain / "loss_curve.png").exists()
  for strategy in ("linear_probe", "lora_qv_r8"):
    result = json.loads((workdir / f"breastmnist_simmim_{strategy}-s0" / "results.json")
                        .read_text())
    assert result["base_checkpoint"]["path"] == str(pretrain / "export" / "model.npz")
    assert not math.isnan(result["metrics"]["test/auc"])
  table = (workdir / "fm_transfer_table.md").read_text()
  assert "| simmim | linear_probe |" in table and "| simmim | lora_qv_r8 |" in table
  assert "| pretrain_simmim | 4 |" in table
  assert (workdir / "plots" / "fm_transfer_auc.png").read_bytes().startswith(b"\x89PNG")
