"""End-to-end study on the synthetic data of tests/fm_adapt/conftest.py: a base run, an adapted
run started from its export, skip and table; command-line overrides for every run, and each
run's workdir lock."""
import json
import pathlib
import re
import subprocess
import sys

import flax.traverse_util
import numpy as np
import pytest

from fm_adapt import study
from fm_adapt.train import workdir as workdir_lib
from fm_adapt.weights import native

REPO = pathlib.Path(__file__).resolve().parents[2]

_BASE_AND_LORA = """
    def sweep(add, arg=None):
      add(name="base")
      add(name="lora", model_init="run:base", model_load=dict(dont_load=["head/.*"]),
          adapt=[dict(name="lora", rank=2, targets=".*attn/(query|value)/kernel")])
      add(name="lora", seed=1, model_init="run:base", model_load=dict(dont_load=["head/.*"]),
          adapt=[dict(name="lora", rank=2, targets=".*attn/(query|value)/kernel")])
"""


def _kernels(params: dict) -> dict[str, np.ndarray]:
  """'/'-joined path -> array of every attention query/value kernel."""
  flat = flax.traverse_util.flatten_dict(params, sep="/")
  return {k: np.asarray(v) for k, v in flat.items()
          if re.fullmatch(r".*attn/(query|value)/kernel", k)}


def test_study_runs_exports_adapts_and_tabulates(tmp_path, tiny_experiment):
  exp = tiny_experiment(_BASE_AND_LORA)
  markdown = study.run_study(str(exp), tmp_path / "study")
  base = json.loads((tmp_path / "study" / "base-s0" / "results.json").read_text())
  lora = json.loads((tmp_path / "study" / "lora-s0" / "results.json").read_text())
  # The adapted run trains only the LoRA factors and the head.
  assert lora["trainable_params"] < base["trainable_params"]
  assert lora["base_checkpoint"]["path"].endswith("base-s0/export/model.npz")
  assert len(lora["base_checkpoint"]["sha256"]) == 64
  # The adapted checkpoint holds no frozen copy of the base.
  saved = list((tmp_path / "study" / "lora-s0" / "ckpt").glob("*/state"))
  assert saved and not any((p / "frozen").exists() for p in saved)
  # Its export has LoRA merged: plain ViT keys only, and the frozen kernels changed by merging.
  exported = native.load_native(tmp_path / "study" / "lora-s0" / "export" / "model.npz")
  base_export = native.load_native(tmp_path / "study" / "base-s0" / "export" / "model.npz")
  assert "lora" not in exported["params"]
  merged, frozen = _kernels(exported["params"]), _kernels(base_export["params"])
  assert merged and merged.keys() == frozen.keys()
  assert all(not np.array_equal(merged[k], frozen[k]) for k in merged)
  assert "| lora | 2 |" in markdown and "| base | 1 |" in markdown
  header = markdown.splitlines()[0]
  for column in ("label_fraction", "total_params", "step_time_ms", "step_time_ratio",
                 "wall_time_s", "peak_memory_mib"):
    assert f" {column} |" in header
  # base trains every parameter: the reference of step_time_ratio.
  assert "| base | 1 | 1 |" in markdown and base["step_time_s"] > 0
  for suffix in ("md", "csv", "tex"):
    assert (tmp_path / "study" / f"results.{suffix}").exists()

  calls = []
  study.run_study(str(exp), tmp_path / "study", train=lambda *a: calls.append(a))
  assert calls == []  # Every run had finished: nothing is trained again.


def test_run_reference_needs_an_earlier_run(tmp_path, tiny_experiment):
  exp = tiny_experiment(_BASE_AND_LORA.replace('add(name="base")', "pass"))
  with pytest.raises(FileNotFoundError, match="has no export yet"):
    study.run_study(str(exp), tmp_path / "study")


def test_override_of_unknown_parent_is_clear():
  import ml_collections
  config = ml_collections.ConfigDict(dict(input=dict(pp="x")))
  with pytest.raises(KeyError, match="no 'model'"):
    study.apply_overrides(config, {"model.variant": "S/16"})
  study.apply_overrides(config, {"input.pp": "y", "schedule": [(".*", None)]})
  assert config.input.pp == "y" and config.schedule[0][0] == ".*"


_TWO_RUNS = """
    def sweep(add, arg=None):
      add(name="a")
      add(name="b", lr=0.01)
"""


def test_command_line_overrides_apply_to_every_run(tmp_path, tiny_experiment, tiny_env):
  exp, workdir = tiny_experiment(_TWO_RUNS), tmp_path / "study"
  out = subprocess.run(
      [sys.executable, "-m", "fm_adapt.study", "--config", str(exp), "--workdir", str(workdir),
       "--config.total_steps=2", "--config.description=cli"],
      cwd=REPO, env=tiny_env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  for run, lr in (("a-s0", 1e-3), ("b-s0", 0.01)):
    config = json.loads((workdir / run / "config.json").read_text())
    assert (config["total_steps"], config["description"], config["lr"]) == (2, "cli", lr)
    assert json.loads((workdir / run / "results.json").read_text())["total_steps"] == 2
  # Finished runs are skipped with the same overrides, and refused with a changed config.
  never = lambda *a: pytest.fail("a finished run was trained again")
  study.run_study(str(exp), workdir, train=never, overrides={"total_steps": 2, "description": "cli"})
  with pytest.raises(study.StudyFailed, match="(?s)a-s0: ConfigChanged: .*total_steps: stored 2, now 4"):
    study.run_study(str(exp), workdir, train=never, overrides={"description": "cli"})


def test_override_of_a_key_the_sweep_sets_is_an_error(tmp_path, tiny_experiment):
  exp = tiny_experiment(_TWO_RUNS)
  never = lambda *a: pytest.fail("trained")
  with pytest.raises(ValueError, match=r"--config.lr overrides \['lr'\] that the sweep sets for "
                                       "run b-s0"):
    study.run_study(str(exp), tmp_path / "s", train=never, overrides={"lr": 0.1})
  with pytest.raises(ValueError, match=r"--config.seed overrides \['seed'\]"):
    study.run_study(str(exp), tmp_path / "s", train=never, overrides={"seed": 1})


_FAKE = {"metrics": {"test/auc": 0.5, "test/acc": 0.5, "val/auc": 0.5}, "trainable_params": 1,
         "data": {"variant": "tiny"}}
_HOLD = ("import sys, time\nfrom fm_adapt.train import workdir\n"
         "with workdir.lock(sys.argv[1]):\n  print('locked', flush=True)\n  time.sleep(600)\n")


def test_study_takes_each_runs_lock(tmp_path, tiny_experiment):
  exp = tiny_experiment(_TWO_RUNS)
  trained = []
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path / "s" / "b-s0")],
                            cwd=REPO, stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(study.StudyFailed, match=f"(?s)b-s0: WorkdirBusy: .*in use by process {holder.pid} "):
      study.run_study(str(exp), tmp_path / "s", train=lambda *a: (trained.append(a), _FAKE)[1])
  finally:
    holder.kill()
    holder.wait()
  assert [a[1].name for a in trained] == ["a-s0"]  # Run b was left to the process holding it.


_COSTS = """
    def sweep(add, arg=None):
      add(name="full")
      add(name="full", seed=1)
      add(name="lora", adapt=[dict(name="lora", rank=2, targets=".*attn/query/kernel")])
      add(name="probe", schedule=[("head/.*", dict(decay_type="constant")), (".*", None)])
"""


def _fake_train(step_times):
  """A `train` for run_study whose results carry cost fields: step time by run name."""

  def train(config, run_dir, *args):
    name = run_dir.name.rsplit("-s", 1)[0]
    return {"metrics": {"test/auc": 0.5}, "trainable_params": 1, "total_params": 2,
            "label_fraction": 0.5, "step_time_s": step_times[name] + 0.001 * config.seed,
            "wall_time_s": 60.0, "peak_memory_bytes": 3 * 2**20,
            "peak_memory_source": "process_peak_rss", "peak_memory_upper_bound": name == "probe",
            "data": {"variant": "tiny"}}

  return train


def _row(markdown, name):
  header = [c.strip() for c in markdown.splitlines()[0].strip("|").split("|")]
  for line in markdown.splitlines()[2:]:
    cells = [c.strip() for c in line.strip("|").split("|")]
    if cells[0] == name:
      return dict(zip(header, cells))
  raise AssertionError(f"no row {name}")


def test_step_time_ratio_against_the_full_fine_tuning_run(tmp_path, tiny_experiment):
  exp = tiny_experiment(_COSTS)
  train = _fake_train({"full": 0.010, "lora": 0.0055, "probe": 0.0021})
  markdown = study.run_study(str(exp), tmp_path / "s", train=train)
  full, lora, probe = (_row(markdown, n) for n in ("full", "lora", "probe"))
  assert full["step_time_ms"] == "10.500 ± 0.707" and full["step_time_ratio"] == "1"
  assert lora["step_time_ratio"] == "0.524"  # 5.5 ms / 10.5 ms, the mean over full's seeds.
  assert probe["step_time_ratio"] == "0.2"
  assert full["label_fraction"] == "0.5" and full["total_params"] == "2"
  assert full["wall_time_s"] == "60.000 ± 0.000" and full["peak_memory_mib"] == "3.000 ± 0.000"
  assert probe["peak_memory_mib"] == "n/a"  # Only an upper bound: not this run's own peak.
  assert full["peak_memory_source"] == "process_peak_rss"
  csv_header = (tmp_path / "s" / "results.csv").read_text().splitlines()[0]
  assert ",step_time_ms_mean,step_time_ms_std,step_time_ms_n,step_time_ratio," in csv_header


def _with_reference(name):
  return _COSTS.replace("\n    def sweep", f"\n    REFERENCE = {name!r}\n    def sweep", 1)


def test_reference_named_by_the_experiment(tmp_path, tiny_experiment):
  exp = tiny_experiment(_with_reference("lora"))
  train = _fake_train({"full": 0.010, "lora": 0.005, "probe": 0.002})
  markdown = study.run_study(str(exp), tmp_path / "s", train=train)
  assert _row(markdown, "lora")["step_time_ratio"] == "1"
  assert _row(markdown, "probe")["step_time_ratio"] == "0.4"


def test_a_reference_that_names_no_run_fails_before_training(tmp_path, tiny_experiment):
  exp = tiny_experiment(_with_reference("Full"))
  never = lambda *a: pytest.fail("trained")
  with pytest.raises(ValueError, match=r"REFERENCE = 'Full' .* one of \['full', 'lora', 'probe'\]"):
    study.run_study(str(exp), tmp_path / "s", train=never)


def test_no_full_fine_tuning_run_leaves_the_ratio_out_and_says_so(tmp_path, tiny_experiment,
                                                                    capsys):
  exp = tiny_experiment(_COSTS.replace('add(name="full")', 'pass').replace(
      'add(name="full", seed=1)', 'pass'))
  markdown = study.run_study(str(exp), tmp_path / "s",
                             train=_fake_train({"lora": 0.005, "probe": 0.002}))
  assert "step_time_ratio" not in markdown and "step_time_ms" in markdown
  assert "No step_time_ratio column: no run of the study trains every parameter" in (
      capsys.readouterr().err)


def test_full_fine_tuning_is_no_adaptation_and_no_frozen_rule():
  import ml_collections
  config = lambda **kw: ml_collections.ConfigDict(dict(dict(adapt=()), **kw))
  assert study.is_full_finetuning(config(schedule=dict(decay_type="cosine")))
  assert study.is_full_finetuning(config(schedule=[("head/.*", dict(decay_type="constant")),
                                                   (".*", dict(decay_type="cosine"))]))
  assert not study.is_full_finetuning(config(schedule=[("head/.*", dict(decay_type="constant")),
                                                       (".*", None)]))
  assert not study.is_full_finetuning(config(adapt=[dict(name="lora")], schedule=dict()))


_THREE = """
    def sweep(add, arg=None):
      add(name="a")
      add(name="bad")
      add(name="c")
"""


def test_a_failed_run_is_recorded_and_the_others_go_on(tmp_path, tiny_experiment):
  exp = tiny_experiment(_THREE)
  trained = []

  def train(config, run_dir, *args):
    """Fails for bad-s0; else writes config.json and results.json as a finished run does."""
    trained.append(run_dir.name)
    if run_dir.name == "bad-s0":
      raise RuntimeError("diverged\nat step 3")
    workdir_lib.check_config(run_dir, config, False, write=True)
    (run_dir / "results.json").write_text(json.dumps(_FAKE))
    return _FAKE

  with pytest.raises(study.StudyFailed, match=r"(?s)1 of 3 runs failed .*bad-s0: RuntimeError: "
                                              r"diverged at step 3") as failure:
    study.run_study(str(exp), tmp_path / "s", train=train)
  assert trained == ["a-s0", "bad-s0", "c-s0"]
  record = json.loads((tmp_path / "s" / "bad-s0" / "failure.json").read_text())
  assert record["error"] == "RuntimeError" and "Traceback" in record["traceback"]
  assert "| a |" in failure.value.table and "| c |" in failure.value.table
  assert "| bad |" not in failure.value.table
  index = (tmp_path / "s" / "index.md").read_text()
  assert "## Failed runs" in index and "bad-s0/failure.json" in index
  # A rerun retries only the failed run (the finished ones are skipped).
  trained.clear()
  study.run_study(str(exp), tmp_path / "s",
                  train=lambda config, run_dir, *a: (trained.append(run_dir.name), _FAKE)[1])
  assert trained == ["bad-s0"]


def test_only_selects_runs_by_regex_and_must_match(tmp_path, tiny_experiment):
  exp = tiny_experiment(_THREE)
  trained = []
  markdown = study.run_study(str(exp), tmp_path / "s", only="^(a|c)-",
                             train=lambda config, run_dir, *a: (trained.append(run_dir.name),
                                                                _FAKE)[1])
  assert trained == ["a-s0", "c-s0"] and "| bad |" not in markdown
  with pytest.raises(ValueError, match=r"--only='\^z' matches no run of the study; its runs are "
                                       r"\['a', 'bad', 'c'\]"):
    study.run_study(str(exp), tmp_path / "s", only="^z", train=lambda *a: pytest.fail("trained"))
  with pytest.raises(ValueError, match="not a regular expression"):
    study.run_study(str(exp), tmp_path / "s", only="(", train=lambda *a: pytest.fail("trained"))


_REPORT = _COSTS + """
    def reference_of(name):
      return "full" if name != "probe" else "missing"

    def report(rows, results):
      names = ",".join(sorted(results))
      seeds = ",".join(str(len(results[n])) for n in sorted(results))
      return {"extra/summary.md": f"{names} {seeds}", "curve.png": b"\\x89PNG fake"}
"""


def test_report_hook_index_and_per_row_references(tmp_path, tiny_experiment, capsys):
  exp = tiny_experiment(_REPORT)
  train = _fake_train({"full": 0.010, "lora": 0.005, "probe": 0.002})
  markdown = study.run_study(str(exp), tmp_path / "s", train=train)
  assert (tmp_path / "s" / "extra" / "summary.md").read_text() == "full,lora,probe 2,1,1"
  assert (tmp_path / "s" / "curve.png").read_bytes() == b"\x89PNG fake"
  index = (tmp_path / "s" / "index.md").read_text()
  for link in ("[results.md](results.md)", "[extra/summary.md](extra/summary.md)",
               "![curve.png](curve.png)", "- full: \n"):
    assert link in index
  assert _row(markdown, "lora")["step_time_ratio"] == "0.476"  # 5 ms / 10.5 ms.
  assert _row(markdown, "probe")["step_time_ratio"] == "n/a"  # Its reference did not run.
  assert "No step_time_ratio for the runs compared with ['missing']" in capsys.readouterr().err


def test_experiment_metrics_replace_the_default_columns(tmp_path, tiny_experiment):
  exp = tiny_experiment('\n    METRICS = ("test/auc", "calib/ece")\n' + _THREE.replace(
      'add(name="bad")', "pass"))
  result = dict(_FAKE, metrics={"test/auc": 0.5, "calib/ece": 0.07, "val/auc": 0.5})
  markdown = study.run_study(str(exp), tmp_path / "s", train=lambda *a: result)
  header = markdown.splitlines()[0]
  assert "| calib/ece |" in header and "val/auc" not in header
  assert _row(markdown, "a")["calib/ece"] == "0.070"


def test_dry_run_measures_a_step_and_trains_nothing(tmp_path, tiny_experiment):
  exp = tiny_experiment(_BASE_AND_LORA)
  plan = study.run_study(str(exp), tmp_path / "s", dry_run=True,
                         train=lambda *a: pytest.fail("trained"))
  lines = plan.splitlines()
  assert lines[0] == "| run | seed | steps | step (s) | estimate |"
  rows = [l.split("|")[1:-1] for l in lines[2:5]]
  assert [r[0].strip() for r in rows] == ["base-s0", "lora-s0", "lora-s1"]
  assert all(float(r[3]) > 0 for r in rows)
  assert rows[1][3] == rows[2][3]  # One training program: measured once.
  assert "3 runs (0 done), 2 distinct training programs measured" in plan
  assert not (tmp_path / "s" / "base-s0").exists()


_SEEDS = """
    def sweep(add, arg=None):
      add(name="a", seed=0)
      add(name="a", seed=1)
      add(name="b", seed=0, lr=0.01)
      add(name="b", seed=1, lr=0.02)
"""


def test_stack_seeds_trains_each_names_seeds_as_one_program(tmp_path, tiny_experiment, capsys):
  exp = tiny_experiment(_SEEDS)
  trained = []
  markdown = study.run_study(str(exp), tmp_path / "s", stack_seeds=True,
                             train=lambda config, run_dir, *a: (trained.append(run_dir.name),
                                                                _FAKE)[1])
  # a: stacked (one group checkpoint, a results.json per seed); b: seeds differ beyond the seed.
  assert trained == ["b-s0", "b-s1"]
  assert sorted(p.name for p in (tmp_path / "s" / "stacked").iterdir()) == ["a-s0+a-s1"]
  for seed in (0, 1):
    result = json.loads((tmp_path / "s" / f"a-s{seed}" / "results.json").read_text())
    assert result["seed"] == seed and result["stacked"]["seeds"] == [0, 1]
  assert "| a | 2 |" in markdown and "| b | 2 |" in markdown
  err = capsys.readouterr().err
  assert "a-s0, a-s1: training as one program (2 seeds stacked)" in err
  assert "b: the seeds train one by one" in err and "lr" in err
  # The stacked seeds finished (the fake `train` of b wrote no results.json: b trains again).
  trained.clear()
  study.run_study(str(exp), tmp_path / "s", stack_seeds=True,
                  train=lambda config, run_dir, *a: (trained.append(run_dir.name), _FAKE)[1])
  assert trained == ["b-s0", "b-s1"]
