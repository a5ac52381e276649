"""Two processes of one job and the TFDS copy of their dataset: built once, by process 0.

The processes are those of the `process_group` fixture (two local processes joined into one
JAX job); the data is the synthetic MedMNIST-layout set of the tiny runs, built into a fresh
TFDS directory per test. Without coordination both processes build the copy at once and one of
them fails renaming its `incomplete.*` folder onto the version folder the other wrote.

"Each host its own disk" is simulated by an experiment file that gives each process, by its
--process_id, a TFDS directory (or a dataset) of its own.
"""
import pathlib
import textwrap
import time

import pytest

RUN_FLAGS = ["--config.total_steps=2", "--config.eval_every=2", "--config.log_every=1"]


def _per_process(lines: str) -> str:
  """Experiment-file lines wrapping the tiny run's get_config; `lines` may use `process`."""
  return textwrap.dedent("""
      import sys

      _tiny_config = get_config

      def get_config(arg=None):
        config = _tiny_config(arg)
        process = int(next(a.split("=", 1)[1] for a in sys.argv
                           if a.startswith("--process_id=")))
  """) + textwrap.indent(textwrap.dedent(lines), "  ") + "  return config\n"


def _error_of(process_group, i: int, error: str, timeout_s: float = 300) -> str:
  """Process `i`'s log once it shows `error` (the processes are killed after the test: one that
  fails waits a while at JAX's shutdown barrier for the other)."""
  deadline = time.time() + timeout_s
  while True:
    ended = process_group.procs[i].poll() is not None  # Before the read: then the log is whole.
    log = process_group.log(i)
    if error in log:
      return log
    if ended or time.time() > deadline:
      pytest.fail(f"process {i} did not fail with {error!r}:\n{log[-3000:]}")
    time.sleep(0.1)


@pytest.fixture()
def short_prepare_timeout(monkeypatch):
  """Processes other than 0 wait 3 s for a dataset (asked before `process_group`, whose
  environment is read from this one)."""
  monkeypatch.setenv("FM_ADAPT_DATA_PREPARE_TIMEOUT_S", "3")


def test_two_processes_on_a_fresh_data_dir_build_it_once_and_train(tmp_path, tiny_experiment,
                                                                    process_group):
  tfds_dir = tmp_path / "fresh_tfds"
  args = ["--config", str(tiny_experiment()), "--workdir", str(tmp_path / "run"), *RUN_FLAGS,
          f"--config.input.data.tfds_dir={tfds_dir}"]
  process_group.start("fm_adapt.main", args)
  statuses = process_group.wait()
  assert statuses == [0, 0], [process_group.tail(i) for i in range(2)]
  built = [p.relative_to(tfds_dir) for p in tfds_dir.glob("*/*/*")]
  assert len(built) == 1 and not built[0].name.startswith("incomplete"), built


def test_a_process_that_does_not_see_the_built_dataset_says_what_to_do(tmp_path, tiny_experiment,
                                                                       process_group):
  hosts = tmp_path / "hosts"
  config = tiny_experiment(_per_process(f"""
      config.input.data.tfds_dir = f"{hosts}/{{process}}/tfds"
  """))
  process_group.start("fm_adapt.main", ["--config", str(config), "--workdir",
                                        str(tmp_path / "run"), *RUN_FLAGS])
  log = _error_of(process_group, 1, "FileNotFoundError: Process 0 built the dataset")
  built = next((hosts / "0" / "tfds").glob("*/*/*"))
  assert f"in {built}, but process 1 does not find it in {hosts}/1/tfds/" in log
  assert "must be one filesystem shared by every host" in log
  assert "datasets.get_dataset(" in log and "once on each host" in log


def test_waiting_for_a_dataset_process_0_never_builds_times_out_naming_it(
    tmp_path, tiny_experiment, tiny_data, short_prepare_timeout, process_group):
  del short_prepare_timeout
  other = tiny_data["one_class_val"]
  config = tiny_experiment(_per_process(f"""
      if process == 1:  # A dataset process 0 does not use.
        config.input.data.path = {other!r}
      config.input.data.tfds_dir = {str(tmp_path / "tfds")!r}
  """))
  process_group.start("fm_adapt.main", ["--config", str(config), "--workdir",
                                        str(tmp_path / "run"), *RUN_FLAGS])
  log = _error_of(process_group, 1, "Error: Process 1 of 2 waited 3 s for "
                  "process 0 to prepare the dataset")
  assert process_group.procs[1].wait(timeout=60) == 1  # At once: one line, no traceback.
  assert "Traceback" not in process_group.log(1)
  name = pathlib.Path(other).stem
  assert f"(read here from {tmp_path / 'tfds'}/" in log and name in log
  assert "FM_ADAPT_DATA_PREPARE_TIMEOUT_S=<seconds>" in log


def test_a_failed_build_on_process_0_is_reported_by_the_processes_waiting_for_it(
    tmp_path, tiny_experiment, process_group):
  blocker = tmp_path / "blocker"  # A file where process 0's TFDS directory should be made.
  blocker.write_text("")
  blocker.chmod(0o755)
  dirs = [str(blocker / "tfds"), str(tmp_path / "tfds")]
  config = tiny_experiment(_per_process(f"""
      config.input.data.tfds_dir = {dirs!r}[process]
  """))
  process_group.start("fm_adapt.main", ["--config", str(config), "--workdir",
                                        str(tmp_path / "run"), *RUN_FLAGS])
  log = _error_of(process_group, 1, "Error: Process 0 failed to prepare the "
                  "dataset custom_npz/synthetic_binary_")
  assert process_group.procs[1].wait(timeout=60) == 1
  assert f"that process 1 waited for (to read from {tmp_path / 'tfds'}/" in log, log[-3000:]
  assert str(blocker) in log.split("Error: Process 0 failed")[-1]
