"""End-to-end training tests.

On real PneumoniaMNIST images (the derived subset_b npz): one-step training through the CLI,
the design's end-to-end tier. On the synthetic data of tests/fm_adapt/conftest.py, with the
quickstart config (flip_lr, AdamW, warm-up and cosine decay): a run killed mid-training that
resumes to the same final parameters as an uninterrupted run, the same losses on 8 simulated
CPU devices as on 1, epochs counted in examples, Ctrl-C / SIGTERM. Then, in process: non-finite
states, config changes, corrupt checkpoints and the log on resume, the selection of the
evaluated state.
"""
import csv
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import sklearn.metrics

from fm_adapt.evaluators import metrics as metrics_lib
from fm_adapt.train import build
from fm_adapt.train import interrupt
from fm_adapt.train import loop
from fm_adapt.train import workdir as workdir_lib
from fm_adapt.train import writer as writer_lib

REPO = pathlib.Path(__file__).resolve().parents[3]
REAL_CONFIG = "experiments/quickstart.py:runlocal,data=subset_b"


def _env(base: dict, devices: int = 1) -> dict:
  """`base` (tiny_env, or os.environ) on `devices` simulated CPU devices."""
  return dict(base, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
              + os.environ["FM_ADAPT_TEST_XLA_FLAGS"],
              PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")


def _main_cmd(config, workdir, *overrides, prelude: str = ""):
  """A `python -m fm_adapt.main` command line, optionally run after a Python prelude."""
  args = ["--config", str(config), "--workdir", str(workdir), "--config.progress=False",
          *overrides]
  if not prelude:
    return [sys.executable, "-m", "fm_adapt.main", *args]
  script = prelude + textwrap.dedent(f"""
      import sys
      from absl import app
      from fm_adapt import main
      sys.argv = ['main'] + {args!r}
      app.run(main.main)
  """)
  return [sys.executable, "-c", script]


def _final_params(workdir: pathlib.Path, step: int) -> dict:
  tree = ocp.StandardCheckpointer().restore(workdir / "ckpt" / str(step) / "state")
  return {"params": tree["params"], "model_state": tree["model_state"], "opt": tree["opt"]}


@pytest.mark.real_data("the design's end-to-end tier on tiny real data: one step of "
                       "experiments/quickstart.py on real PneumoniaMNIST images (subset_b, "
                       "624 test / 524 val examples) through the CLI")
def test_one_step_train_and_evaluate(tmp_path, shared_data_dir):
  env = _env(dict(os.environ, FM_ADAPT_DATA_DIR=str(shared_data_dir)))
  out = subprocess.run(_main_cmd(REAL_CONFIG, tmp_path / "w", "--config.total_steps=1"), env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "RESULT model=vit" in out.stdout
  results = json.loads((tmp_path / "w" / "results.json").read_text())
  assert results["best_step"] == 1
  assert results["metrics"]["test/num_examples"] == 624
  assert results["metrics"]["val/num_examples"] == 524
  assert 0.0 <= results["metrics"]["test/auc"] <= 1.0
  rows = [json.loads(l) for l in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
  assert any("train/loss" in r for r in rows) and any("val/auc" in r for r in rows)
  assert (tmp_path / "w" / "param_counts.md").exists()
  assert list((tmp_path / "w" / "tb").iterdir())


def test_killed_run_resumes_to_same_parameters(tmp_path, tiny_experiment, tiny_env):
  config, env = tiny_experiment(quickstart=True), _env(tiny_env)
  steps = ["--config.total_steps=12", "--config.checkpoint_every=2", "--config.eval_every=6"]
  reference = tmp_path / "reference"
  out = subprocess.run(_main_cmd(config, reference, *steps), env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]

  killed = tmp_path / "killed"
  # Slow each step down in the killed process only, so the kill lands mid-training.
  slow = ("import time\nfrom fm_adapt.train import mesh\n_gb = mesh.global_batch\n"
          "mesh.global_batch = lambda *a: (time.sleep(0.5), _gb(*a))[1]\n")
  proc = subprocess.Popen(_main_cmd(config, killed, *steps, prelude=slow), env=env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  (killed / "ckpt").mkdir(parents=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    done = [int(p.name) for p in (killed / "ckpt").glob("*") if p.name.isdigit()]
    if done and max(done) >= 4:
      break
    time.sleep(0.1)
  assert proc.poll() is None, "the run ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed / "results.json").exists()

  out = subprocess.run(_main_cmd(config, killed, *steps), env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert "Resuming" in out.stderr
  want, got = _final_params(reference, 12), _final_params(killed, 12)
  flat_want, flat_got = ocp.tree.to_flat_dict(want), ocp.tree.to_flat_dict(got)
  assert flat_want.keys() == flat_got.keys()
  for key in flat_want:
    np.testing.assert_array_equal(flat_want[key], flat_got[key], err_msg=str(key))


_LOSSES_SCRIPT = textwrap.dedent("""
    import json, runpy, sys
    import jax
    from fm_adapt.train import build, loop, mesh, step
    config = runpy.run_path(sys.argv[1])["get_config"]()
    config.mesh = MESH
    run = build.build_run(config, config.data_dir)
    state = run.init_state()
    update = step.jit_update(run.update_fn, state, run.mesh)
    it = iter(run.train_loader)
    losses = []
    for _ in range(3):
      state, m = update(state, run.rng, mesh.global_batch(next(it), run.mesh))
      losses.append(float(m["loss"]))
    print("LOSSES", json.dumps(losses), jax.device_count())
""")


@pytest.mark.parametrize("devices,mesh", [(8, "[('data', 4), ('fsdp', 2)]")])
def test_same_loss_on_8_devices_as_on_1(devices, mesh, tiny_experiment, tiny_env, tiny_data):
  """Batches of 32 from 40 examples: the second step's batch is padded (8 real examples)."""
  config = tiny_experiment(quickstart=True)

  def losses(n, mesh_cfg):
    out = subprocess.run(
        [sys.executable, "-c", _LOSSES_SCRIPT.replace("MESH", mesh_cfg), str(config)],
        env=_env(tiny_env, n), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = next(l for l in out.stdout.splitlines() if l.startswith("LOSSES"))
    assert line.endswith(str(n))
    return json.loads(line.split(" ", 1)[1].rsplit(" ", 1)[0])

  assert tiny_data["sizes"]["train"] == 40
  one = losses(1, "[('data', -1), ('fsdp', 1)]")
  many = losses(devices, mesh)
  assert len(set(one)) == 3  # Three different batches (a repeated one would hide an error).
  np.testing.assert_allclose(many, one, rtol=2e-5)


@pytest.mark.parametrize("last_batch, total", [("pad", 8), ("carry", 7)])
def test_epochs_count_examples_not_whole_batches(quickstart_config, tiny_data, last_batch, total):
  """40 images at batch 16 are 3 steps an epoch (the last padded, 8 images): 2.5 epochs are
  ceil(2.5 * 3) = 8 steps; carried across epochs, ceil(2.5 * 40 / 16) = 7, not 6."""
  config = quickstart_config()
  config.total_steps, config.total_epochs, config.input.batch_size = 0, 2.5, 16
  config.input.last_batch = last_batch
  run = build.build_run(config, config.data_dir)
  assert tiny_data["sizes"]["train"] == 40
  assert (run.num_train_examples, run.steps_per_epoch, run.total_steps) == (40, 3, total)
  # The logged train/epoch: 3 padded steps are one epoch; 3 carried steps are 48 / 40 images.
  assert run.epoch_of(3) == pytest.approx(1.0 if last_batch == "pad" else 1.2)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_the_step_and_says_how_to_resume(tmp_path, tiny_experiment, tiny_env,
                                                      signum):
  """Ctrl-C / SIGTERM mid-training: a checkpoint of that step, a one-line hint, status 128+N."""
  workdir = tmp_path / "w"
  proc = subprocess.Popen(
      _main_cmd(tiny_experiment(quickstart=True), workdir, "--config.total_steps=1000",
                "--config.checkpoint_every=1000", "--config.log_every=1"),
      env=_env(tiny_env), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None and not (
      metrics.exists() and metrics.read_text().strip()):
    time.sleep(0.1)
  assert proc.poll() is None, "the run ended before it could be interrupted"
  proc.send_signal(signum)
  _, err = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signum, err[-3000:]
  assert "run the same command to resume" in err and "Traceback" not in err
  stopped = int(err.split("Stopped at step ")[1].split(";")[0])
  assert [p.name for p in (workdir / "ckpt").glob("*") if p.name.isdigit()] == [str(stopped)]
  state = ocp.StandardCheckpointer().restore(workdir / "ckpt" / str(stopped) / "state")
  assert int(state["step"]) == stopped
  logged = [json.loads(line) for line in metrics.read_text().splitlines()]
  assert stopped in [row["step"] for row in logged if "train/loss" in row]  # Resume starts after.


# In process, on the synthetic data of tests/fm_adapt/conftest.py (4 steps of a ViT-mu/7).


def _steps(workdir: pathlib.Path, kind: str = "ckpt") -> list[int]:
  return sorted(int(p.name) for p in (workdir / kind).glob("*") if p.name.isdigit())


def _finite_arrays(path: pathlib.Path) -> bool:
  leaves = [np.asarray(x) for x in jax.tree.leaves(ocp.StandardCheckpointer().restore(path))]
  return all(np.isfinite(x).all() for x in leaves if np.issubdtype(x.dtype, np.floating))


def _diverge_from(monkeypatch, bad_step: int) -> None:
  """From `bad_step` on, the update returns NaN parameters (loss still finite at `bad_step`,
  as it is computed before the update), as a diverging run does."""
  original = loop.build.build_run

  def build_run(*args, **kwargs):
    run = original(*args, **kwargs)
    update = run.update_fn

    def diverging(state, rng, batch):
      new, measurements = update(state, rng, batch)
      scale = jnp.where(new["step"] >= bad_step, jnp.nan, 1.0)
      params = jax.tree.map(lambda p: p * scale, new["params"])
      return dict(new, params=params), dict(measurements, l2_params=optax.global_norm(params))

    run.update_fn = diverging
    return run

  monkeypatch.setattr(loop.build, "build_run", build_run)


def test_a_stop_at_an_evaluation_step_evaluates_it_before_saving(tmp_path, tiny_config,
                                                                 monkeypatch):
  """A stop request at a step that is due an evaluation runs it first: the resume starts after
  that step, so a skipped evaluation would be lost and could change the best checkpoint (the
  first of equal validation scores is kept)."""
  config = tiny_config()  # Evaluates at steps 2 and 4.
  reference = loop.train_and_evaluate(config, tmp_path / "reference")
  workdir = tmp_path / "stopped"
  with monkeypatch.context() as patch:
    patch.setattr(interrupt.StopOnSignal, "requested", lambda self, step: step == 2)
    with pytest.raises(interrupt.Stopped):
      loop.train_and_evaluate(config, workdir)
  assert [r["step"] for r in writer_lib.read_metrics(workdir) if "val/auc" in r] == [2]
  resumed = loop.train_and_evaluate(config, workdir)
  assert resumed["resumed_from_step"] == 2
  evaluated = [[r["step"] for r in writer_lib.read_metrics(w) if "val/auc" in r]
               for w in (workdir, tmp_path / "reference")]
  assert evaluated == [[2, 4], [2, 4]]
  assert resumed["best_step"] == reference["best_step"]
  assert resumed["metrics"] == reference["metrics"]


def test_non_finite_state_is_never_saved_and_resume_starts_before_it(
    tmp_path, tiny_config, monkeypatch, capsys):
  config, workdir = tiny_config(checkpoint_every=1, keep_ckpts=5), tmp_path / "w"
  with monkeypatch.context() as patch:
    _diverge_from(patch, 3)
    with pytest.raises(loop.NonFiniteError) as error:
      loop.train_and_evaluate(config, workdir)
  message = str(error.value)
  assert f"at step 3 in {workdir}:" in message and "<workdir>" not in message
  assert f"The last finite checkpoint is {workdir / 'ckpt' / '2'}" in message
  assert _steps(workdir) == [1, 2] and _steps(workdir, "best") == [2]
  assert all(_finite_arrays(workdir / "ckpt" / str(s) / "state") for s in (1, 2))
  assert not (workdir / "export").exists()
  capsys.readouterr()
  results = loop.train_and_evaluate(config, workdir)  # The same command resumes from step 2.
  assert f"Resuming from {workdir / 'ckpt' / '2'}" in capsys.readouterr().err
  assert results["total_steps"] == 4 and _steps(workdir) == [1, 2, 3, 4]


def test_diverging_lr_saves_nothing(tmp_path, tiny_config):
  """lr=1e30: the parameters of step 1 are finite but their norm is not; nothing is saved."""
  with pytest.raises(loop.NonFiniteError, match="at step 1 .*No checkpoint was saved before it"):
    loop.train_and_evaluate(tiny_config(lr=1e30, checkpoint_every=1), tmp_path / "w")
  assert _steps(tmp_path / "w") == [] and _steps(tmp_path / "w", "best") == []


def test_finished_run_resumes_only_with_its_config(tmp_path, tiny_config, tiny_data):
  workdir = tmp_path / "w"
  first = loop.train_and_evaluate(tiny_config(), workdir)
  assert first["selection"] == f"best_checkpoint (val/auc at step {first['best_step']})"
  stored = (workdir / "config.json").read_text()
  with pytest.raises(workdir_lib.ConfigChanged, match="total_steps: stored 4, now 8"):
    loop.train_and_evaluate(tiny_config(total_steps=8, lr=0.5), workdir)
  assert (workdir / "config.json").read_text() == stored
  with pytest.raises(workdir_lib.ConfigChanged, match="--allow_harmless_changes"):
    loop.train_and_evaluate(tiny_config(log_every=2), workdir)
  again = loop.train_and_evaluate(tiny_config(log_every=2), workdir, allow_harmless_changes=True)
  assert again["metrics"] == first["metrics"] and again["best_step"] == first["best_step"]
  # The best checkpoint's per-sample predictions, re-scored, give the reported test AUC.
  rows = list(csv.DictReader((workdir / "predictions" / "test.csv").open()))
  assert len(rows) == tiny_data["sizes"]["test"] == 30
  assert (workdir / "predictions" / "val.csv").exists()
  auc = sklearn.metrics.roc_auc_score([int(r["label"]) for r in rows],
                                      [float(r["score_1"]) for r in rows])
  assert auc == pytest.approx(first["metrics"]["test/auc"], abs=1e-12)


def _truncate_arrays(step_dir: pathlib.Path) -> None:
  for path in (step_dir / "state").rglob("*"):
    if path.is_file() and path.parent.name == "d":
      path.write_bytes(path.read_bytes()[:10])


def test_resume_after_a_corrupt_latest_checkpoint_logs_each_step_once(tmp_path, tiny_config,
                                                                      capsys):
  workdir = tmp_path / "w"
  loop.train_and_evaluate(tiny_config(), workdir)
  (workdir / "results.json").unlink()  # As if killed after step 4 was saved (and corrupted).
  _truncate_arrays(workdir / "ckpt" / "4")
  capsys.readouterr()
  loop.train_and_evaluate(tiny_config(), workdir)
  err = capsys.readouterr().err
  assert f"checkpoint {workdir / 'ckpt' / '4'} cannot be restored" in err
  assert f"Resuming from {workdir / 'ckpt' / '2'}" in err
  assert _steps(workdir) == [2, 4] and (workdir / "corrupt" / "ckpt_4").is_dir()
  rows = writer_lib.read_metrics(workdir)
  assert [r["step"] for r in rows if "train/loss" in r] == [1, 2, 3, 4]
  assert [r["step"] for r in rows if "val/auc" in r] == [2, 4]
  assert sum(any(k.startswith("best/") for k in r) for r in rows) == 1


def test_no_finite_best_metric_selects_the_final_state(tmp_path, tiny_config):
  """A validation split of one class leaves val/auc undefined: a warning and results.json say
  so, in JSON."""
  with pytest.warns(metrics_lib.UndefinedMetricWarning,
                    match="Split 'val': every example has class '0'"):
    results = loop.train_and_evaluate(tiny_config("one_class_val"), tmp_path / "w")
  assert results["best_step"] is None
  assert results["selection"] == "final_state (no finite val/auc)"
  text = (tmp_path / "w" / "results.json").read_text()
  saved = json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c} in results.json"))
  assert saved["metrics"]["val/auc"] is None and saved["selection"] == results["selection"]


def test_best_metric_of_no_periodic_evaluator_fails_before_training(tmp_path, tiny_config):
  with pytest.raises(ValueError, match="best_metric='vall/auc' names no evaluator .*\\['val'\\]"):
    loop.train_and_evaluate(tiny_config(best_metric="vall/auc"), tmp_path / "w")
  assert _steps(tmp_path / "w") == []
