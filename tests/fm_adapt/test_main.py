"""The command line fails early and clearly on bad input, and on a workdir in use."""
import pathlib
import subprocess
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[2]


def _main(*args, env=None):
  return subprocess.run([sys.executable, "-m", "fm_adapt.main", *args], cwd=REPO, env=env,
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


def test_second_process_on_a_workdir_exits_at_once_naming_the_holder(tmp_path, tiny_experiment,
                                                                     tiny_env):
  """Two real training processes on one workdir: the second stops before touching it."""
  args = ["--config", str(tiny_experiment()), "--workdir", str(tmp_path / "w"),
          "--config.total_steps=100000", "--config.eval_every=100000",
          "--config.checkpoint_every=100000"]
  holder = subprocess.Popen([sys.executable, "-m", "fm_adapt.main", *args], cwd=REPO,
                            env=tiny_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    lock, metrics = tmp_path / "w" / ".lock", tmp_path / "w" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and holder.poll() is None and not (
        metrics.exists() and metrics.read_text().strip()):
      time.sleep(0.1)
    assert holder.poll() is None, "the first run ended before the second started"
    assert lock.read_text().strip() == str(holder.pid)
    out = _main(*args, env=tiny_env)
    assert holder.poll() is None  # The second process did not wait for the first.
    assert out.returncode == 1
    assert f"is in use by process {holder.pid}" in out.stderr and "Traceback" not in out.stderr
  finally:
    holder.kill()
    holder.wait()


def test_a_workdir_orbax_cannot_write_to_is_one_clear_error(tmp_path):
  out = _main("--config", "experiments/quickstart.py:runlocal", "--workdir", "s3://bucket/run")
  assert out.returncode == 1 and out.stderr.strip().splitlines()[-1] == (
      "Error: The workdir s3://bucket/run is on s3://, where orbax cannot write checkpoints: use "
      "a local path or one of gs://.")
  assert not (REPO / "s3:").exists()


def test_experiments_that_import_the_study_module_load_from_both_commands(tmp_path):
  """fm_transfer.py imports fm_adapt.study (to load its sibling experiment): under either
  command the experiment loads (here up to the override check) instead of failing on flags
  defined twice, as it did when fm_adapt.study defined its flags at import."""
  for module in ("fm_adapt.main", "fm_adapt.study"):
    out = subprocess.run(
        [sys.executable, "-m", module, "--config", "experiments/fm_transfer.py:runlocal",
         "--workdir", str(tmp_path / module), "--config.learning_rate=1e-3"],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "defined twice" not in out.stderr, (module, out.stderr[-2000:])
    assert out.returncode != 0 and "learning_rate" in out.stderr, (module, out.stderr[-2000:])
