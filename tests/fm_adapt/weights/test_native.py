"""fm_adapt's own export format round-trips and is told apart from other layouts."""
import numpy as np
import pytest

from fm_adapt import weights
from fm_adapt.weights import native


def test_native_roundtrip_and_detection(tmp_path):
  variables = {"params": {"head": {"kernel": np.arange(6.0).reshape(2, 3)}},
               "batch_stats": {"bn": {"mean": np.ones(3)}}}
  path = native.save_native(tmp_path / "m.npz", variables)
  assert weights.detect_name(path) == "fm_adapt"
  loaded = weights.load(path)
  np.testing.assert_array_equal(loaded["params"]["head"]["kernel"], variables["params"]["head"]["kernel"])
  np.testing.assert_array_equal(loaded["batch_stats"]["bn"]["mean"], np.ones(3))


def test_other_npz_is_refused_by_native_loader(tmp_path):
  np.savez(tmp_path / "bv.npz", **{"params/Transformer/encoder_norm/scale": np.ones(3)})
  assert weights.detect_name(tmp_path / "bv.npz") != "fm_adapt"
  with pytest.raises(ValueError, match="not an fm_adapt export"):
    native.load_native(tmp_path / "bv.npz")
