"""fm_adapt's own foundation model: the file is the one the README states, and the quickstart
adapts it by default (the encoder loaded, the MAE decoder reported unused, a fresh head).
Training from it is the ordinary path of `model_init` (tests/fm_adapt/train)."""
import hashlib
import pathlib
import re
import types

import jax
import numpy as np
import pytest

from fm_adapt import foundation
from fm_adapt.train import model_fns
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


def test_quickstart_loads_the_foundation_model(tiny_data, capsys):
  """The quickstart's model and load config take the file's encoder and a fresh head."""
  config = _quickstart(tiny_data, "runlocal,init=foundation")
  assert config.model.variant == "Ti/4" and config.model_init == str(foundation.FILE)
  fns = model_fns.build_model(config, types.SimpleNamespace(num_classes=2),
                              (foundation.IMAGE_SIZE, foundation.IMAGE_SIZE, 3))
  assert fns.base["sha256"] == foundation.SHA256
  fresh = jax.jit(fns.init_fn)(jax.random.key(0))
  loaded = fns.load(fresh)
  err = capsys.readouterr().err
  assert "keys params/decoder/* (the pixel decoder" in err and "head/kernel" in err
  pretrained = native.load_native(str(foundation.FILE))["params"]
  for got, want in zip(jax.tree.leaves(loaded["params"]["encoder"]),
                       jax.tree.leaves(pretrained["encoder"])):
    np.testing.assert_array_equal(got, want)
  np.testing.assert_array_equal(loaded["params"]["head"]["kernel"],
                                fresh["params"]["head"]["kernel"])


def test_quickstart_arguments(tiny_data):
  assert _quickstart(tiny_data, "runlocal").model.variant == "mu/7"  # Seconds: from scratch.
  assert "model_init" not in _quickstart(tiny_data, "init=scratch") or not _quickstart(
      tiny_data, "init=scratch").model_init
  with pytest.raises(ValueError, match="applies to init=scratch"):
    _quickstart(tiny_data, "variant=S/4")
  with pytest.raises(ValueError, match="Unknown init 'imagenet'"):
    _quickstart(tiny_data, "init=imagenet")
