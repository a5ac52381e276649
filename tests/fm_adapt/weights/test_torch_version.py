"""`.pth` files are read only with a torch whose `torch.load(weights_only=True)` has no known
bypass: torch >= 2.6 (CVE-2025-32434). Older versions are refused before `torch.load` runs."""
import contextlib
import sys
import types

import numpy as np
import pytest

from fm_adapt.weights import readers


class _LoadReached(Exception):
  """Raised by the fake torch.load: the version check let the file through."""


def _fake_torch(version: str) -> types.ModuleType:
  torch = types.ModuleType("torch")
  torch.__version__ = version

  def load(*args, **kwargs):
    raise _LoadReached(version)

  torch.load = load
  # torch >= 2.5 has `torch.serialization.safe_globals` (readers allows argparse.Namespace).
  torch.serialization = types.SimpleNamespace(safe_globals=lambda allowed: contextlib.nullcontext())
  return torch


@pytest.fixture()
def pth(tmp_path):
  path = tmp_path / "model.pth"
  path.write_bytes(b"not read before the version check")
  return path


@pytest.mark.parametrize("version", ["2.5.1", "2.5.1+cpu", "2.4.0", "2.0.0", "1.13.1"])
def test_torch_before_2_6_is_refused_naming_the_cve_and_the_fix(pth, monkeypatch, version):
  monkeypatch.setitem(sys.modules, "torch", _fake_torch(version))
  with pytest.raises(ImportError) as error:
    readers.read_arrays(pth)
  message = str(error.value)
  for part in (str(pth), f"torch {version}", "CVE-2025-32434", 'pip install "torch>=2.6"',
               ".safetensors"):
    assert part in message


@pytest.mark.parametrize("version", ["2.6.0", "2.6.0+cpu", "2.10.1", "2.13.0+cpu", "3.0.0"])
def test_torch_2_6_and_later_reach_torch_load(pth, monkeypatch, version):
  monkeypatch.setitem(sys.modules, "torch", _fake_torch(version))
  with pytest.raises(_LoadReached):
    readers.read_arrays(pth)


def test_real_torch_reads_at_2_6_and_is_refused_at_2_5(tmp_path, monkeypatch):
  torch = pytest.importorskip("torch", reason="the PyTorch oracle needs the test extra: "
                              'pip install -e ".[dev,test]"')
  path = tmp_path / "real.pth"
  torch.save({"w": torch.arange(4, dtype=torch.float32)}, path)
  monkeypatch.setattr(torch, "__version__", "2.6.0")
  np.testing.assert_array_equal(readers.read_arrays(path)["w"], np.arange(4, dtype=np.float32))
  monkeypatch.setattr(torch, "__version__", "2.5.1")
  with pytest.raises(ImportError, match="CVE-2025-32434"):
    readers.read_arrays(path)
