"""Seeds as one program (`stacked_loop.train_and_evaluate_stacked`), end to end on the tiny
synthetic data (40 train images at batch 16: epochs of 3 steps, the third padded).

Each seed of a stacked group must end where the run of that seed alone ends: the same final
parameters (to float rounding), the same results.json; with dropout (a tiny ViT) so that each
seed's keys matter, and with BatchNorm (a tiny ResNet) so that the stacked statistics and the
padded batch's mask matter. A group killed mid-training (SIGKILL) resumes from its checkpoint to the
uninterrupted group's final state exactly; a seed that diverges stops the group and nothing of
that step is saved.
"""
import json
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import orbax.checkpoint as ocp
import pytest

from fm_adapt.train import finite
from fm_adapt.train import interrupt
from fm_adapt.train import loop
from fm_adapt.train import stacked
from fm_adapt.train import stacked_loop
from fm_adapt.train import writer as writer_lib

REPO = pathlib.Path(__file__).resolve().parents[3]
SEEDS = (0, 3)
MODELS = {
    # Dropout: each seed's keys decide its masks (a plain vmap of rbg keys gives seed 3 bits
    # drawn from seed 0's key, see `stacked`).
    "vit": dict(model_name="vit", model=dict(variant="mu/7", pool_type="gap", dropout=0.2)),
    # BatchNorm statistics in model_state, masked on the padded third batch.
    "resnet": dict(model_name="resnet", model=dict(depth=18, width=4)),
}
# Momentum SGD in the comparisons with single runs. Adam turns rounding differences of small
# gradients (a batched matmul or convolution sums in another order) into steps of up to +-lr,
# which compound: ~1e-6 on a tiny ViT's LayerNorm bias and ~1e-5 on a width-4 ResNet kernel
# after 5 steps (seen). With SGD rounding stays rounding, so the comparison tests the stacking,
# not Adam; the kill / resume test keeps Adam.
SGD = dict(optax_name="momentum", lr=0.05)


def _configs(tiny_config, model: str, **overrides):
  configs = []
  for seed in SEEDS:
    config = tiny_config(**MODELS[model], **overrides)
    config.seed = seed
    configs.append(config)
  return configs


def _final_state(path: pathlib.Path, step: int) -> dict:
  """The flat checkpointed state of `step`: parameters, BatchNorm statistics, optimizer, step."""
  tree = ocp.StandardCheckpointer().restore(path / "ckpt" / str(step) / "state")
  return ocp.tree.to_flat_dict(tree)


def _export(workdir: pathlib.Path) -> dict:
  with np.load(workdir / "export" / "model.npz", allow_pickle=False) as data:
    return {k: data[k] for k in data.files}


@pytest.mark.parametrize("model", ["vit", "resnet"])
def test_each_seed_equals_its_run_alone(tmp_path, tiny_config, model):
  """5 steps (the third padded), evaluated at 2, 4, 5: the stacked seeds' final parameters,
  BatchNorm statistics and optimizer state, exported best weights and results equal the single
  runs' (to 1e-5 of each array's largest entry)."""
  configs = _configs(tiny_config, model, total_steps=5, **SGD)
  alone = [tmp_path / f"alone-s{s}" for s in SEEDS]
  for config, workdir in zip(configs, alone):
    loop.train_and_evaluate(config, workdir)
  together = [tmp_path / f"m-s{s}" for s in SEEDS]
  results = stacked_loop.train_and_evaluate_stacked(configs, together)

  group = tmp_path / "stacked" / "+".join(w.name for w in together)
  final = _final_state(group, 5)
  # BatchNorm statistics are compared too (the ViT has none).
  assert {str(k[0]) for k in final} == {"params", "opt", "step"} | (
      {"model_state"} if model == "resnet" else set())
  for k, workdir in enumerate(alone):
    want_results = json.loads((workdir / "results.json").read_text())
    want = _final_state(workdir, 5)
    assert set(want) == set(final)
    for key, value in want.items():
      _assert_close(final[key][k], value, str(key))
    got_export, want_export = _export(together[k]), _export(workdir)
    assert set(got_export) == set(want_export)
    for key in want_export:
      _assert_close(got_export[key], want_export[key], key)
    got_results = json.loads((together[k] / "results.json").read_text())
    assert got_results == json.loads(json.dumps(results[k]))
    assert set(got_results) == set(want_results) | {"stacked"}
    assert _comparable(got_results, together[k]) == _comparable(want_results, workdir)
    stacked_record = got_results["stacked"]
    assert stacked_record["seeds"] == list(SEEDS) and stacked_record["group_dir"] == str(group)
    assert got_results["step_time_s"] == pytest.approx(
        stacked_record["group_step_time_s"] / len(SEEDS))
    for name, value in want_results["metrics"].items():
      assert got_results["metrics"][name] == pytest.approx(value, rel=1e-5, abs=1e-6), name
    assert (json.loads((together[k] / "config.json").read_text()) ==
            json.loads((workdir / "config.json").read_text()))
    assert sorted(p.name for p in (together[k] / "predictions").iterdir()) == ["test.csv",
                                                                              "val.csv"]
    logged = writer_lib.read_metrics(together[k])
    assert [r["step"] for r in logged if "train/loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in logged if "val/auc" in r] == [2, 4, 5]
  # One training checkpoint: the group's.
  assert not [p for w in together for p in (w / "ckpt").glob("[0-9]*")]


def _assert_close(got: np.ndarray, want: np.ndarray, name: str) -> None:
  """Equal to 1e-5 relative to the array's largest entry (float rounding of a sum in another
  order is relative to the summands, not to each small result)."""
  scale = float(np.max(np.abs(want))) if np.size(want) else 0.0
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=max(1e-5 * scale, 1e-9), err_msg=name)


# Costs measured by the clock and the allocator: they differ between any two runs.
MEASURED = ("step_time_s", "wall_time_s", "peak_memory_bytes", "peak_memory_upper_bound")


def _comparable(results: dict, workdir: pathlib.Path) -> dict:
  """results.json without the metrics (compared within rounding), the measured costs and the
  stacked group's record, with the workdir's own path made relative."""
  out = {k: v for k, v in results.items() if k not in ("metrics", "stacked", *MEASURED)}
  out["export"] = str(pathlib.Path(out["export"]).relative_to(workdir))
  return out


_KILLED = textwrap.dedent("""
    import json, sys, time
    import ml_collections
    from fm_adapt.train import stacked, stacked_loop
    real = stacked.stacked_batch  # Each step slowed down, so that the kill lands mid-training.
    stacked.stacked_batch = lambda *args: (time.sleep(0.5), real(*args))[1]
    configs = [ml_collections.ConfigDict(c) for c in json.loads(sys.argv[1])]
    stacked_loop.train_and_evaluate_stacked(configs, json.loads(sys.argv[2]))
""")


def test_killed_group_resumes_exactly(tmp_path, tiny_config, tiny_env, capfd):
  """A group SIGKILLed after its step-4 checkpoint resumes from its newest checkpoint (stacked
  state and both seeds' data iterators) to the uninterrupted group's state at step 8, bit for
  bit, and each seed's log holds every step once."""
  configs = _configs(tiny_config, "vit", total_steps=8, eval_every=3)
  reference = [tmp_path / f"ref-s{s}" for s in SEEDS]
  want = stacked_loop.train_and_evaluate_stacked(configs, reference)

  killed = [tmp_path / f"kill-s{s}" for s in SEEDS]
  group = tmp_path / "stacked" / "+".join(w.name for w in killed)
  args = [json.dumps([c.to_dict() for c in configs]), json.dumps([str(w) for w in killed])]
  proc = subprocess.Popen([sys.executable, "-c", _KILLED, *args], env=tiny_env, cwd=REPO,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if (group / "ckpt" / "4").is_dir():
      break
    time.sleep(0.1)
  assert proc.poll() is None, "the group ended before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not any((w / "results.json").exists() for w in killed)
  saved = sorted(int(p.name) for p in (group / "ckpt").iterdir() if p.name.isdigit())
  assert 4 in saved and max(saved) < 8

  capfd.readouterr()
  got = stacked_loop.train_and_evaluate_stacked(configs, killed)
  assert f"Resuming the seeds {list(SEEDS)} from {group / 'ckpt'}/{max(saved)}" in (
      capfd.readouterr().err)
  ref_group = tmp_path / "stacked" / "+".join(w.name for w in reference)
  flat_want, flat_got = _final_state(ref_group, 8), _final_state(group, 8)
  assert flat_want.keys() == flat_got.keys()
  for key in flat_want:
    np.testing.assert_array_equal(flat_got[key], flat_want[key], err_msg=str(key))
  for k in range(len(SEEDS)):
    assert got[k]["metrics"] == want[k]["metrics"]
    logged = writer_lib.read_metrics(killed[k])
    assert [r["step"] for r in logged if "train/loss" in r] == list(range(1, 9))
    assert _without_rate(logged) == _without_rate(writer_lib.read_metrics(reference[k]))


def _without_rate(rows: list[dict]) -> list[dict]:
  return [{k: v for k, v in row.items() if k != "train/img_per_sec"} for row in rows]


def test_a_diverging_seed_stops_the_group_unsaved(tmp_path, tiny_config, monkeypatch):
  """NaN images for seed 3 from step 3 on: the group stops at step 3 naming seed 3's workdir;
  the group keeps its step-2 checkpoint only, no results are written for any seed."""
  configs = _configs(tiny_config, "vit", total_steps=4, checkpoint_every=1, eval_every=4)
  workdirs = [tmp_path / f"nan-s{s}" for s in SEEDS]
  real_batch = stacked.stacked_batch
  calls = []

  def poisoned(batch, mesh):
    calls.append(1)
    if len(calls) >= 3:
      batch = dict(batch, image=batch["image"].copy())
      batch["image"][1] = np.nan
    return real_batch(batch, mesh)

  monkeypatch.setattr(stacked, "stacked_batch", poisoned)
  with pytest.raises(finite.NonFiniteError) as error:
    stacked_loop.train_and_evaluate_stacked(configs, workdirs)
  message = str(error.value)
  assert "at step 3" in message and str(workdirs[1]) in message and "Seed 3" in message
  group = tmp_path / "stacked" / "+".join(w.name for w in workdirs)
  assert sorted(int(p.name) for p in (group / "ckpt").glob("[0-9]*")) == [1, 2]
  assert not [w for w in workdirs if (w / "results.json").exists()]
  assert not [p for w in workdirs for p in (w / "best").glob("[0-9]*")]
  state = _final_state(group, 2)
  assert all(np.isfinite(v).all() for v in state.values() if v.dtype.kind == "f")


def test_runs_that_differ_beyond_the_seed_are_refused(tmp_path, tiny_config):
  configs = _configs(tiny_config, "vit")
  configs[1].lr = 0.5
  with pytest.raises(stacked_loop.StackError, match=r"(?s)differs .* in:\n  lr: stored"):
    stacked_loop.train_and_evaluate_stacked(configs, [tmp_path / "a", tmp_path / "b"])
  configs = _configs(tiny_config, "vit")
  configs[1].seed = configs[0].seed
  with pytest.raises(stacked_loop.StackError, match="repeat a seed"):
    stacked_loop.train_and_evaluate_stacked(configs, [tmp_path / "a", tmp_path / "b"])
  configs = _configs(tiny_config, "vit", probe="cached")
  with pytest.raises(stacked_loop.StackError, match="config.probe='cached'"):
    stacked_loop.train_and_evaluate_stacked(configs, [tmp_path / "a", tmp_path / "b"])
  assert not (tmp_path / "a").exists()  # Refused before anything is written.


def test_a_run_trained_alone_is_not_stacked(tmp_path, tiny_config):
  configs = _configs(tiny_config, "vit", total_steps=2)
  workdirs = [tmp_path / f"w-s{s}" for s in SEEDS]
  loop.train_and_evaluate(configs[1], workdirs[1])
  with pytest.raises(stacked_loop.StackError, match="trained alone"):
    stacked_loop.train_and_evaluate_stacked(configs, workdirs)


def test_a_stop_request_saves_the_group_at_that_step(tmp_path, tiny_config, monkeypatch):
  """Ctrl-C / SIGTERM (a stop request after step 3): the group checkpoint of step 3, each
  seed's metrics of step 3 written (a resume starts after it), `Stopped` raised."""
  configs = _configs(tiny_config, "vit", total_steps=6, log_every=5, eval_every=6,
                     checkpoint_every=6)
  workdirs = [tmp_path / f"stop-s{s}" for s in SEEDS]
  monkeypatch.setattr(interrupt.StopOnSignal, "requested", lambda self, step: step == 3)
  with pytest.raises(interrupt.Stopped) as stopped:
    stacked_loop.train_and_evaluate_stacked(configs, workdirs)
  assert stopped.value.step == 3
  group = tmp_path / "stacked" / "+".join(w.name for w in workdirs)
  assert sorted(int(p.name) for p in (group / "ckpt").iterdir() if p.name.isdigit()) == [3]
  for workdir in workdirs:
    assert [r["step"] for r in writer_lib.read_metrics(workdir) if "train/loss" in r] == [3]
    assert not [r for r in writer_lib.read_metrics(workdir) if "val/auc" in r]


def test_a_stop_at_an_evaluation_step_evaluates_each_seed_before_saving(tmp_path, tiny_config,
                                                                       monkeypatch):
  """The resume starts after the stopping step: its due evaluation must not be skipped."""
  configs = _configs(tiny_config, "vit", total_steps=4, eval_every=2, checkpoint_every=4)
  workdirs = [tmp_path / f"s{s}" for s in SEEDS]
  monkeypatch.setattr(interrupt.StopOnSignal, "requested", lambda self, step: step == 2)
  with pytest.raises(interrupt.Stopped):
    stacked_loop.train_and_evaluate_stacked(configs, workdirs)
  for workdir in workdirs:
    assert [r["step"] for r in writer_lib.read_metrics(workdir) if "val/auc" in r] == [2]


def test_default_group_dir_names_the_runs():
  short = stacked_loop.default_group_dir(["/s/lora-s0", "/s/lora-s1"])
  assert str(short) == "/s/stacked/lora-s0+lora-s1"
  many = [f"/s/{'x' * 60}-s{seed}" for seed in range(10)]
  long_dir = stacked_loop.default_group_dir(many)
  assert long_dir.parent == pathlib.Path("/s/stacked") and len(long_dir.name) < 200
  assert long_dir.name.startswith(f"{'x' * 60}-s0+9_more_")
  assert long_dir != stacked_loop.default_group_dir(many[:9] + ["/s/other-s9"])
