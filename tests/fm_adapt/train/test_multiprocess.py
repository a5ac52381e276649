"""Real two-process runs: pre-empted, resumed, and equal to the one-process run.

Two local processes, each with 2 simulated CPU devices, join one JAX job on 127.0.0.1
(`jax.distributed`, gloo collectives; the `process_group` fixture). A SIGTERM to ONE of them
stops BOTH at the same step (JAX's pre-emption sync point), each saving its own data-iterator
state; the resumed job's per-step losses (a fingerprint of each global batch) and its final
weights equal those of one process with 4 devices, the same mesh, init and seed. The layout is
data=1 x fsdp=4: each process feeds its own part of every global batch and holds only some
shards of every sharded parameter (no process may read another's); the run starts from a
pretrained fm_adapt export with the head kept fresh. (A data=4 layout from scratch ran here too
until 2026-12-05; it tested nothing this one does not, at a minute and a half of CI.)

Data: the synthetic MedMNIST-layout set of the tiny runs (tests/fm_adapt/conftest.py).
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[3]
TOTAL_STEPS = 40
FIRST_SAVE = 10  # Few multi-process saves: each is a barrier of both processes (slow on 2 cores).
RUN_FLAGS = [f"--config.total_steps={TOTAL_STEPS}", f"--config.checkpoint_every={FIRST_SAVE}",
             "--config.eval_every=20", "--config.log_every=1"]


def _fsdp_from_pretrained(pretrained: pathlib.Path) -> str:
  """Experiment-file lines that wrap the tiny run's get_config: fsdp=4, from `pretrained`."""
  return textwrap.dedent(f"""
      _tiny_config = get_config

      def get_config(arg=None):
        config = _tiny_config(arg)
        config.mesh = (("data", 1), ("fsdp", 4))
        config.model_init = {str(pretrained)!r}
        config.model_load = dict(dont_load=["head/.*"])
        return config
  """)


def _run_one_process(config: str, workdir: pathlib.Path, env: dict, devices: int,
                     flags: list[str]) -> None:
  env = dict(env, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             + os.environ["FM_ADAPT_TEST_XLA_FLAGS"])
  out = subprocess.run([sys.executable, "-m", "fm_adapt.main", "--config", config, "--workdir",
                        str(workdir), *flags], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]


def _losses(workdir: pathlib.Path) -> dict[int, float]:
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _weights(workdir: pathlib.Path) -> dict[str, np.ndarray]:
  with np.load(workdir / "export" / "model.npz", allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def _wait_for(path: pathlib.Path, group, timeout_s: float = 600) -> None:
  deadline = time.time() + timeout_s
  while not path.exists():
    ended = [i for i, p in enumerate(group.procs) if p.poll() is not None]
    assert not ended, f"process {ended} ended before {path}:\n{group.tail(ended[0])}"
    assert time.time() < deadline, f"{path} did not appear"
    time.sleep(0.05)


def _preempt(group, args: list[str], workdir: pathlib.Path, signalled: int) -> int:
  """Starts the job, SIGTERMs process `signalled` after the first checkpoint; the stop step."""
  procs = group.start("fm_adapt.main", args)
  _wait_for(workdir / "ckpt" / str(FIRST_SAVE), group)
  procs[signalled].send_signal(signal.SIGTERM)  # One host is told; both must stop at one step.
  statuses = group.wait()
  logs = [group.log(i) for i in range(2)]
  assert statuses == [143, 143], logs
  stopped = [line for line in logs[0].splitlines() if line.startswith("Stopped at step")]
  assert stopped and all(stopped[0] in log for log in logs), logs
  step = int(stopped[0].split()[3].rstrip(";"))
  assert FIRST_SAVE <= step < TOTAL_STEPS
  saved = sorted(p.name for p in (workdir / "ckpt" / str(step) / "iterator").glob("*.json"))
  assert saved == ["process_0-of-2.json", "process_1-of-2.json"]
  assert "process 1 of 2, 2 local / 4 global cpu devices" in logs[1]
  return step


def _assert_same_training(workdir: pathlib.Path, reference: pathlib.Path) -> None:
  losses, expected = _losses(workdir), _losses(reference)
  assert sorted(losses) == list(range(1, TOTAL_STEPS + 1)) == sorted(expected)
  np.testing.assert_allclose([losses[s] for s in sorted(losses)],
                             [expected[s] for s in sorted(expected)], rtol=1e-5, atol=1e-6)
  got, want = _weights(workdir), _weights(reference)
  assert sorted(got) == sorted(want)
  for key in want:
    # A key bias shifts every logit of a softmax row alike: its gradient is zero up to rounding,
    # which Adam scales to lr-sized steps, so across reduction orders it is noise.
    if not key.endswith("attn/key/bias"):
      np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5, err_msg=key)


def test_preempted_two_process_fsdp_run_from_pretrained_resumes_exactly(
    tmp_path, tiny_experiment, tiny_env, process_group):
  base = tmp_path / "base"
  _run_one_process(str(tiny_experiment()), base, tiny_env, 1, ["--config.total_steps=2"])
  config = str(tiny_experiment(_fsdp_from_pretrained(base / "export" / "model.npz")))
  signalled = 1  # The host that is not the coordinator: the stop reaches process 0 through JAX.
  reference = tmp_path / "one"
  _run_one_process(config, reference, tiny_env, 4, RUN_FLAGS)  # Also builds the TFDS copy.
  workdir = tmp_path / "two"
  args = ["--config", config, "--workdir", str(workdir), *RUN_FLAGS]

  step = _preempt(process_group, args, workdir, signalled)
  process_group.start("fm_adapt.main", args)
  statuses = process_group.wait()
  assert statuses == [0, 0], [process_group.tail(i) for i in range(2)]
  assert f"Resuming from {workdir / 'ckpt'}/{step}" in process_group.log(0)
  assert "mesh {'data': 1, 'fsdp': 4}" in process_group.log(0)
  # The load took effect: the second loss differs from that of the same seed's fresh init
  # (the first is ln 2 either way: the zero-initialized head is kept).
  assert abs(_losses(reference)[2] - _losses(base)[2]) > 1e-4
  _assert_same_training(workdir, reference)
