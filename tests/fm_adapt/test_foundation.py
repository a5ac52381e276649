"""fm_adapt's own foundation model: the file is the one the README states, and the quickstart
fine-tunes it by default (the encoder loaded, the MAE decoder reported unused, a fresh head)."""
import hashlib
import pathlib
import re

import jax
import numpy as np
import pytest

from fm_adapt import foundation
from fm_adapt.train import loop
from fm_adapt.weights import native

REPO = pathlib.Path(__file__).resolve().parents[2]


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_file_is_the_one_the_readme_states():
  assert foundation.FILE.stat().st_size <= 25 * 2**20
  lines = [line for line in (REPO / "README.md").read_text().splitlines()
           if foundation.FILE.name in line and "sha256" in line]
  assert len(lines) == 1, "README needs one line naming the file and its sha256"
  stated = re.findall(r"\b[0-9a-f]{64}\b", lines[0])
  assert stated == [foundation.SHA256] == [_sha256(foundation.FILE)]


def test_a_missing_file_says_how_to_make_it(monkeypatch, tmp_path):
  monkeypatch.setattr(foundation, "FILE", tmp_path / "mae_vit_ti4_28px.npz")
  with pytest.raises(FileNotFoundError, match="experiments/mim_pretrain.py:objective=mae"):
    foundation.path()


def _quickstart(tiny_data, arg: str):
  from experiments import quickstart  # pylint: disable=import-outside-toplevel
  config = quickstart.get_config(arg)
  config.input.data = dict(name="npz", path=tiny_data["tiny"], tfds_dir=tiny_data["root"] + "/tfds")
  config.data_dir = tiny_data["root"]
  config.progress = False
  return config


def test_quickstart_fine_tunes_the_foundation_model(tiny_data, tmp_path, capsys):
  config = _quickstart(tiny_data, "runlocal,init=foundation")
  assert config.model.variant == "Ti/4" and config.model_init == str(foundation.FILE)
  config.total_steps = 1
  results = loop.train_and_evaluate(config, tmp_path / "w")
  err = capsys.readouterr().err
  assert "decoder" in err and "head" in err  # Unused decoder, missing head: both reported.
  assert results["base_checkpoint"]["sha256"] == foundation.SHA256
  pretrained = native.load_native(str(foundation.FILE))["params"]["encoder"]
  tuned = native.load_native(results["export"])["params"]["encoder"]
  # One small step from the foundation model: close to it, not equal (it trained).
  diffs = [float(np.abs(a - b).max()) for a, b in
           zip(jax.tree.leaves(pretrained), jax.tree.leaves(tuned))]
  assert 0 < max(diffs) < 0.05


def test_quickstart_arguments(tiny_data):
  assert _quickstart(tiny_data, "runlocal").model.variant == "mu/7"  # Seconds: from scratch.
  assert "model_init" not in _quickstart(tiny_data, "init=scratch") or not _quickstart(
      tiny_data, "init=scratch").model_init
  with pytest.raises(ValueError, match="applies to init=scratch"):
    _quickstart(tiny_data, "variant=S/4")
  with pytest.raises(ValueError, match="Unknown init 'imagenet'"):
    _quickstart(tiny_data, "init=imagenet")
