"""The launchers, run as `python -m launch ...` subprocesses: dry-run output, the scripts and
commands they print actually carrying the fm_adapt command through the shell unchanged, the
non-dry-run paths against fake sbatch / gcloud, bad input, no JAX import, and the README's
launcher commands."""
import json
import os
import pathlib
import re
import shlex
import stat
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
# ':' and ',' (experiment arguments), a quote and spaces (shell quoting), '$' (no expansion).
CONFIG = "experiments/medmnist_v2.py:dataset=retinamnist,model=resnet18_28"
DESCRIPTION = "--config.description=it's 2 sites, $HOME"
FM_ADAPT = ["fm_adapt.main", "--config", CONFIG, "--workdir", "gs://my-bucket/retina",
            DESCRIPTION]
EXPECTED_ARGS = [*FM_ADAPT[1:], "--multihost"]
SLURM = ["slurm", "--nodes", "2", "--gpus_per_node", "4", "--time", "04:00:00",
         "--partition", "gpu", "--env", "FM_ADAPT_DATA_DIR=/shared/data dir"]
TPU = ["tpu", "--tpu", "my-pod", "--zone", "us-central2-b", "--project", "my-project",
       "--env", "FM_ADAPT_DATA_DIR=gs://my-bucket/data"]
# A stand-in for Python on the hosts: records the module, its arguments and some environment.
FAKE_PYTHON = """#!{python}
import json, os, sys
print(json.dumps(dict(argv=sys.argv[1:], cwd=os.getcwd(), env={{k: os.environ.get(k) for k in (
    "FM_ADAPT_DATA_DIR", "JAX_LOCAL_DEVICE_IDS")}})))
"""
# Records its arguments to $RECORD, then exits 0 (a stand-in for sbatch / gcloud).
FAKE_TOOL = """#!{python}
import json, os, sys
open(os.environ["RECORD"], "w").write(json.dumps(sys.argv[1:]))
"""

# Drops srun's own options and runs the rest (the one task of a one-node step).
FAKE_SRUN = """#!/bin/sh
while [ "${{1#--}}" != "$1" ]; do shift; done
exec "$@"
"""


def _launch(args, cwd, path=None, **env):
  environment = dict(os.environ, PYTHONPATH=str(REPO), **env)
  if path is not None:
    environment["PATH"] = path
  return subprocess.run([sys.executable, "-m", "launch", *args], cwd=cwd, env=environment,
                        capture_output=True, text=True, timeout=60)


def _executable(path: pathlib.Path, text: str) -> pathlib.Path:
  path.write_text(text.format(python=sys.executable))
  path.chmod(path.stat().st_mode | stat.S_IEXEC)
  return path


@pytest.fixture
def fake_python(tmp_path):
  return _executable(tmp_path / "fake_python", FAKE_PYTHON)


def test_slurm_dry_run_prints_the_script_and_the_sbatch_command(tmp_path):
  result = _launch([*SLURM, "--", *FM_ADAPT], tmp_path)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  for directive in ("--job-name=retina", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=4",
                    "--time=04:00:00", "--partition=gpu", f"--chdir={tmp_path}",
                    "--output=logs/%x-%j.log", "--signal=TERM@120"):
    assert f"#SBATCH {directive}" in lines, directive
  assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in lines
  assert "export FM_ADAPT_DATA_DIR='/shared/data dir'" in lines
  srun = [line for line in lines if line.startswith("srun ")]
  assert len(srun) == 1
  assert shlex.split(srun[0]) == ["srun", "--kill-on-bad-exit=1", "--output=logs/%x-%j-%N.log",
                                  "python3", "-m", "fm_adapt.main", *EXPECTED_ARGS]
  assert lines[-1] == "sbatch logs/retina.sbatch"
  assert "submitted nothing" in result.stdout
  script = (tmp_path / "logs" / "retina.sbatch").read_text()
  assert script.strip() in result.stdout
  assert script.index("export FM_ADAPT_DATA_DIR") < script.index("srun ")


def test_slurm_script_runs_the_command_unchanged(tmp_path, fake_python):
  """The written script, run by bash with a pass-through srun, hands fm_adapt its exact argv."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "srun", FAKE_SRUN)
  result = _launch([*SLURM, "--python", str(fake_python), "--", *FM_ADAPT], tmp_path)
  assert result.returncode == 0, result.stderr
  ran = subprocess.run(["bash", str(tmp_path / "logs" / "retina.sbatch")], cwd=tmp_path,
                       env=dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}"),
                       capture_output=True, text=True, timeout=60, check=True)
  record = json.loads(ran.stdout)
  assert record["argv"] == ["-m", "fm_adapt.main", *EXPECTED_ARGS]
  assert record["env"] == {"FM_ADAPT_DATA_DIR": "/shared/data dir",
                           "JAX_LOCAL_DEVICE_IDS": "0,1,2,3"}


def test_slurm_options(tmp_path):
  result = _launch(["slurm", "--nodes", "1", "--gpus_per_node", "0", "--time", "30",
                    "--cpus_per_task", "8", "--signal_before", "0", "--sbatch", "account=my-lab",
                    "--sbatch", "exclusive", "--job_name", "cpu-run", "--setup",
                    "source ~/venv/bin/activate", "--", "fm_adapt.study", "--config=e.py",
                    "--workdir=w", "--multihost"], tmp_path)
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  for directive in ("--job-name=cpu-run", "--cpus-per-task=8", "--account=my-lab", "--exclusive"):
    assert f"#SBATCH {directive}" in lines, directive
  assert not [line for line in lines if "gpus-per-node" in line or "--signal" in line
              or "JAX_LOCAL_DEVICE_IDS" in line or "--partition" in line]
  assert "source ~/venv/bin/activate" in lines
  srun = next(line for line in lines if line.startswith("srun "))
  assert srun.startswith("srun --cpus-per-task=8 --kill-on-bad-exit=1 ")
  assert srun.endswith("-m fm_adapt.study --config=e.py --workdir=w --multihost")  # added once


def test_slurm_submit_runs_sbatch_on_the_written_script(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "sbatch", FAKE_TOOL)
  record = tmp_path / "record.json"
  script = tmp_path / "jobs" / "r.sbatch"
  result = _launch([*SLURM, "--submit", "--script", str(script), "--", *FM_ADAPT], tmp_path,
                   path=f"{bin_dir}:{os.environ['PATH']}", RECORD=str(record))
  assert result.returncode == 0, result.stderr
  assert json.loads(record.read_text()) == [str(script)]
  assert script.read_text().strip() in result.stdout
  assert (tmp_path / "logs").is_dir()  # SLURM needs the directory of --output to exist.


def _remote_command(stdout: str) -> tuple[list[str], str]:
  """The printed gcloud command as the local shell splits it, and its --command."""
  printed = stdout.split("\n# ")[0].replace("\\\n", " ")
  argv = shlex.split(printed)
  return argv, argv[argv.index("--command") + 1]


def test_tpu_dry_run_prints_the_gcloud_command(tmp_path):
  result = _launch([*TPU, "--", *FM_ADAPT], tmp_path)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(
      "gcloud compute tpus tpu-vm ssh my-pod --zone us-central2-b --project my-project "
      "--worker=all \\\n    --command '")
  argv, remote = _remote_command(result.stdout)
  assert argv[:12] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my-pod", "--zone",
                       "us-central2-b", "--project", "my-project", "--worker=all", "--command"]
  assert len(argv) == 13
  steps = remote.split(" && ")
  assert steps[:3] == ["cd fm_adapt", "mkdir -p logs",
                       "export FM_ADAPT_DATA_DIR=gs://my-bucket/data"]
  run, redirect = steps[-1].split(" > ")
  assert shlex.split(run) == ["python3", "-m", "fm_adapt.main", *EXPECTED_ARGS]
  assert redirect == "logs/retina-$(hostname).log 2>&1"
  assert "# gcloud compute tpus tpu-vm ssh my-pod --zone us-central2-b --project my-project " \
         "--worker=0 --command 'tail -f fm_adapt/logs/retina-*.log'" in result.stdout
  assert "Dry run: nothing ran" in result.stdout


@pytest.mark.parametrize("detach", [False, True])
def test_tpu_worker_command_runs_fm_adapt_unchanged(tmp_path, fake_python, detach):
  """The --command, run by bash in a worker's home, runs fm_adapt with its exact argv."""
  home = tmp_path / "home"
  (home / "fm_adapt").mkdir(parents=True)
  result = _launch([*TPU, "--python", str(fake_python), *(["--detach"] if detach else []),
                    "--", *FM_ADAPT], tmp_path)
  assert result.returncode == 0, result.stderr
  _, remote = _remote_command(result.stdout)
  ran = subprocess.run(["bash", "-c", remote], cwd=home, capture_output=True, text=True,
                       timeout=60, check=True)
  assert ran.stdout == ""  # Everything goes to the worker's log.
  log = home / "fm_adapt" / "logs" / f"retina-{os.uname().nodename}.log"
  for _ in range(100):  # --detach: the process may still be starting.
    if log.exists() and log.read_text().endswith("\n"):
      break
    time.sleep(0.1)
  record = json.loads(log.read_text())
  assert record["argv"] == ["-m", "fm_adapt.main", *EXPECTED_ARGS]
  assert record["cwd"] == str(home / "fm_adapt")
  assert record["env"]["FM_ADAPT_DATA_DIR"] == "gs://my-bucket/data"


def test_tpu_run_calls_gcloud_with_the_printed_command(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  _executable(bin_dir / "gcloud", FAKE_TOOL)
  record = tmp_path / "record.json"
  result = _launch([*TPU, "--run", "--", *FM_ADAPT], tmp_path,
                   path=f"{bin_dir}:{os.environ['PATH']}", RECORD=str(record))
  assert result.returncode == 0, result.stderr
  printed, _ = _remote_command(result.stdout)
  assert ["gcloud", *json.loads(record.read_text())] == printed


@pytest.mark.parametrize("args, message", [
    (["slurm", "--nodes", "1", "--gpus_per_node", "1", "--time", "1"],
     "No fm_adapt command: put it after --"),
    (["tpu", "--tpu", "p", "--zone", "z", "--"], "No fm_adapt command: put it after --"),
    (["slurm", "--nodes", "0", "--gpus_per_node", "1", "--time", "1", "--", *FM_ADAPT],
     "argument --nodes: must be at least 1 (got 0)"),
    (["slurm", "--nodes", "two", "--gpus_per_node", "1", "--time", "1", "--", *FM_ADAPT],
     "argument --nodes: 'two' is not a whole number"),
    (["tpu", "--tpu", "p", "--zone", "z", "--", "fm_adapt.train", "--config", "c", "--workdir",
      "gs://b/w"], "Unknown fm_adapt module 'fm_adapt.train' after --: the launcher runs "
                   "fm_adapt.main or fm_adapt.study"),
    (["tpu", "--tpu", "p", "--zone", "z", "--", "python", "-m", "fm_adapt.main"],
     "give the module without the interpreter"),
    (["tpu", "--tpu", "p", "--zone", "z", "--", "fm_adapt/main.py"], "not a file path"),
    (["tpu", "--tpu", "p", "--zone", "z", "--", "fm_adapt.main", "--config", "c"],
     "The fm_adapt command has no --workdir"),
    (["tpu", "--tpu", "p", "--zone", "z", "--", "fm_adapt.main", "--workdir", "gs://b/w"],
     "The fm_adapt command has no --config"),
    (["tpu", "--tpu", "p", "--zone", "z", "--", *FM_ADAPT, "--process_id=0"],
     "Remove --process_id from the fm_adapt command"),
    (["tpu", "--tpu", "p", "--zone", "z", "--", *FM_ADAPT, "--coordinator_address", "h:1"],
     "Remove --coordinator_address from the fm_adapt command"),
    (["tpu", "--tpu", "p", "--zone", "z", "--", *FM_ADAPT, "--nomultihost"],
     "Remove '--nomultihost'"),
    (["tpu", "--tpu", "p", "--zone", "z", "--", "fm_adapt.main", "--config", "c", "--workdir",
      "/local/run"], "Use gs://BUCKET/..., or pass --allow_local_workdir"),
    (["slurm", "--nodes", "1", "--gpus_per_node", "1", "--time", "4h", "--", *FM_ADAPT],
     "--time '4h' is not a SLURM time: give MINUTES, HH:MM:SS or D-HH:MM:SS"),
    (["slurm", "--nodes", "1", "--gpus_per_node", "1", "--time", "1", "--sbatch", "nodes=3",
      "--", *FM_ADAPT], "the launcher writes --nodes itself; use its own option"),
    (["slurm", "--nodes", "1", "--gpus_per_node", "1", "--time", "1", "--env", "A-B=1", "--",
      *FM_ADAPT], "--env 'A-B=1' is not KEY=VALUE"),
    (["slurm", "--nodes", "1", "--gpus_per_node", "1", "--time", "1", "--env", "A=1", "--env",
      "A=2", "--", *FM_ADAPT], "--env A is given twice"),
    (["slurm", "--nodes", "1", "--gpus_per_node", "1", "--time", "1", "--job_name", "my run",
      "--", *FM_ADAPT], "--job_name cannot name the job"),
    (["slurm", "--nodes", "1", "--gpus_per_node", "1", "--time", "1", "fm_adapt.main"],
     "unrecognized arguments: fm_adapt.main (the fm_adapt command goes after --"),
    (["pbs", "--", *FM_ADAPT], "invalid choice: 'pbs'"),
])
def test_bad_input_is_an_error_naming_the_fix(tmp_path, args, message):
  result = _launch(args, tmp_path)
  assert result.returncode == 2
  assert message in result.stderr
  assert result.stdout == ""
  assert not (tmp_path / "logs").exists()  # Nothing is written for bad input.


def test_submit_and_run_without_the_tool_say_so(tmp_path):
  empty = tmp_path / "empty_bin"
  empty.mkdir()
  slurm = _launch(["slurm", "--nodes", "1", "--gpus_per_node", "1", "--time", "1", "--submit",
                   "--", *FM_ADAPT], tmp_path, path=str(empty))
  assert slurm.returncode == 2
  assert "sbatch is not on PATH: run this on a SLURM login node" in slurm.stderr
  tpu = _launch([*TPU, "--run", "--", *FM_ADAPT], tmp_path, path=str(empty))
  assert tpu.returncode == 2
  assert "gcloud is not on PATH: install the Google Cloud CLI" in tpu.stderr


def test_launch_imports_neither_jax_nor_fm_adapt(tmp_path):
  code = textwrap.dedent(f"""
      import contextlib, io, runpy, sys
      sys.argv = ["launch", *{[*TPU, "--", *FM_ADAPT]!r}]
      with contextlib.redirect_stdout(io.StringIO()):
        try:
          runpy.run_module("launch", run_name="__main__")
        except SystemExit as e:
          assert e.code == 0, e.code
      print(sorted(m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "fm_adapt")))
      """)
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
  assert result.returncode == 0, result.stderr
  assert result.stdout.strip() == "[]"


def test_fm_adapt_entry_points_take_the_flags_the_launcher_relies_on():
  """--multihost is added and the explicit join flags refused: both entry points define them."""
  runs = [subprocess.Popen([sys.executable, "-m", module, "--helpfull"], cwd=REPO, text=True,
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
          for module in ("fm_adapt.main", "fm_adapt.study")]
  for run in runs:
    out, _ = run.communicate(timeout=120)
    for flag in (r"\[no\]multihost", "coordinator_address", "num_processes", "process_id",
                 "config", "workdir"):
      assert re.search(rf"^\s+--{flag}:", out, re.M), (run.args, flag)


README_BLOCK = re.compile(
    r"<!-- launch-dry-run -->\n```bash\n(?P<command>.*?)\n```\n.*?```text\n(?P<output>.*?)\n```"
    r"\n<!-- /launch-dry-run -->", re.S)


def test_readme_launcher_commands_print_what_the_readme_shows(tmp_path):
  blocks = list(README_BLOCK.finditer((REPO / "README.md").read_text()))
  commands = [shlex.split(b["command"].replace("\\\n", " ")) for b in blocks]
  assert [argv[:4] for argv in commands] == [["python", "-m", "launch", "slurm"],
                                             ["python", "-m", "launch", "tpu"]]
  for argv, block in zip(commands, blocks):
    result = _launch(argv[3:], tmp_path)
    assert result.returncode == 0, (argv, result.stderr)
    printed = result.stdout.splitlines()
    shown = [line for line in block["output"].splitlines() if line != "..."]
    assert len(shown) >= 2
    for line in shown:
      assert line in printed, (argv, line, result.stdout)
