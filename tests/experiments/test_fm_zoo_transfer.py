"""experiments/fm_zoo_transfer.py: no weights -> a clean exit saying what it looked for; weights
found -> one run per strategy with the catalogue's model, loader and normalisation; and a whole
runlocal study from a (reduced) RETFound checkpoint on the real RetinaMNIST."""
import dataclasses
import pathlib

import numpy as np
import pytest
import safetensors.numpy

from fm_adapt import study
from fm_adapt.weights import zoo

FILE = pathlib.Path(__file__).resolve().parents[2] / "experiments" / "fm_zoo_transfer.py"


def _load():
  return study.load_experiment(str(FILE))[0]  # A fresh import: nothing cached.


def test_no_weights_exits_cleanly_saying_what_it_looked_for(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv(zoo.WEIGHTS_ENV, str(tmp_path))
  with pytest.raises(SystemExit) as exit_:
    study.expand(_load(), "runlocal")
  assert exit_.value.code == 0
  out = capsys.readouterr().out
  assert "no catalogue checkpoint" in out and "RETFound_cfp_weights.pth" in out


def test_found_checkpoints_give_one_run_per_strategy(tmp_path, monkeypatch, capsys):
  for name in ("RETFound_cfp_weights.pth", "biomedclip.bin", "rad_dino.safetensors"):
    (tmp_path / name).write_bytes(b"")
  monkeypatch.setenv(zoo.WEIGHTS_ENV, str(tmp_path))
  runs = study.expand(_load(), "runlocal")
  assert [r.name for r in runs] == ["retfound_cfp_linear_probe", "retfound_cfp_lora_qv_r8",
                                    "biomedclip_linear_probe", "biomedclip_lora_qv_r8"]
  retfound = runs[0].overrides
  assert retfound["model"] == zoo.model_config("retfound_cfp")
  assert retfound["model_load"] == dict(name="retfound", dont_load=["head/.*", "fc_norm/.*"])
  assert retfound["input.pp"] == "resize(32)|gray_to_rgb|normalize('imagenet')"
  assert runs[2].overrides["input.pp"].startswith("resize(32)|gray_to_rgb|normalize((0.4814")
  assert "rad_dino" in capsys.readouterr().out  # Left out: normalisation not verified.
  full = study.expand(_load(), "models=retfound_cfp,strategies=full+vpt_deep_10")
  assert [(r.name, r.seed) for r in full][:2] == [("retfound_cfp_full", 0),
                                                  ("retfound_cfp_vpt_deep_10", 0)]
  with pytest.raises(ValueError, match=r"Unknown catalogue models \['retfund'\]"):
    study.expand(_load(), "models=retfund")


def _reduced_retfound_checkpoint(path: pathlib.Path, width=32, depth=2, patch=16, grid=2):
  """A RETFound / MAE pretraining file in timm's names, at 'mu' width and depth."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: (0.1 * rng.normal(size=shape)).astype(np.float32)
  sd = {"cls_token": normal(1, 1, width), "pos_embed": normal(1, 1 + grid * grid, width),
        "patch_embed.proj.weight": normal(width, 3, patch, patch),
        "patch_embed.proj.bias": normal(width), "norm.weight": 1 + normal(width),
        "norm.bias": normal(width), "mask_token": normal(1, 1, width),
        "decoder_embed.weight": normal(16, width)}
  for i in range(depth):
    for name, shape in [("norm1.weight", (width,)), ("norm1.bias", (width,)),
                        ("attn.qkv.weight", (3 * width, width)), ("attn.qkv.bias", (3 * width,)),
                        ("attn.proj.weight", (width, width)), ("attn.proj.bias", (width,)),
                        ("norm2.weight", (width,)), ("norm2.bias", (width,)),
                        ("mlp.fc1.weight", (2 * width, width)), ("mlp.fc1.bias", (2 * width,)),
                        ("mlp.fc2.weight", (width, 2 * width)), ("mlp.fc2.bias", (width,))]:
      sd[f"blocks.{i}.{name}"] = normal(*shape)
  safetensors.numpy.save_file(sd, str(path))


@pytest.mark.real_data("RetinaMNIST, the dataset of the study's one-command RETFound example")
def test_runlocal_study_from_a_reduced_retfound(shared_data_dir, tmp_path, monkeypatch):
  del shared_data_dir  # FM_ADAPT_DATA_DIR is set: the study reads retinamnist.npz from it.
  entry = zoo.ENTRIES["retfound_cfp"]
  reduced = dataclasses.replace(entry, model=dict(entry.model, variant="mu/16", posemb_grid=2),
                                image_size=32)
  monkeypatch.setitem(zoo.ENTRIES, "retfound_cfp", reduced)
  weights = tmp_path / "weights"
  weights.mkdir()
  _reduced_retfound_checkpoint(weights / "retfound_cfp.safetensors")
  monkeypatch.setenv(zoo.WEIGHTS_ENV, str(weights))
  table = study.run_study(f"{FILE}:models=retfound_cfp,size=28,runlocal", tmp_path / "study")
  assert "retfound_cfp_linear_probe" in table and "retfound_cfp_lora_qv_r8" in table
  counts = (tmp_path / "study" / "retfound_cfp_lora_qv_r8-s0" / "param_counts.md").read_text()
  assert "lora" in counts
