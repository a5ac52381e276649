"""The command line fails early and clearly on bad input."""
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[2]


def _main(*args):
  return subprocess.run([sys.executable, "-m", "fm_adapt.main", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=120)


def test_unknown_override_key(tmp_path):
  out = _main("--config", "experiments/quickstart.py", "--workdir", str(tmp_path),
              "--config.learning_rate=1e-3")
  assert out.returncode != 0 and "learning_rate" in out.stderr


def test_unknown_experiment_argument(tmp_path):
  out = _main("--config", "experiments/medmnist_v2.py:modle=resnet18_28", "--workdir", str(tmp_path))
  assert out.returncode != 0 and "Unknown config argument 'modle'" in out.stderr
  assert "model" in out.stderr


def test_unknown_model_name_lists_valid(tmp_path):
  out = _main("--config", "experiments/medmnist_v2.py:model=resnet99", "--workdir", str(tmp_path))
  assert out.returncode != 0 and "resnet18_28" in out.stderr


def test_missing_data_dir_is_clear(tmp_path):
  out = _main("--config", "experiments/quickstart.py:runlocal", "--workdir", str(tmp_path / "w"),
              "--data_dir", str(tmp_path / "nowhere"))
  assert out.returncode != 0 and "FM_ADAPT_DATA_DIR" in out.stderr
