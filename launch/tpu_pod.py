"""Cloud TPU VM pods: one `gcloud ... tpu-vm ssh --worker=all` that starts fm_adapt on every worker.

  python -m launch tpu --tpu my-pod --zone us-central2-b [--project my-project] \
      [--env FM_ADAPT_DATA_DIR=gs://my-bucket/data] [--detach] [--run] \
      -- fm_adapt.main --config ... --workdir gs://my-bucket/run

Every worker runs, in its checkout (`--checkout`, relative to the worker's home unless
absolute), `<python> -m <command> --multihost` with the `--env` variables exported; JAX finds
the pod (workers, this worker's id, the coordinator) from the TPU metadata. Each worker writes
its log to `<checkout>/<log_dir>/<job>-<hostname>.log` on its own disk.

The workers of a pod share one workdir (checkpoints are written by all of them together), so
`--workdir` must be on `gs://` unless `--allow_local_workdir` says it is a mount every worker
shares. `--detach` starts the processes under nohup and returns, so a dropped ssh connection
does not stop the run. The default is a dry run: the gcloud command is printed, nothing runs;
`--run` runs it.
"""
from __future__ import annotations

import argparse
import posixpath
import shlex
import shutil
import subprocess

from launch import command as command_lib

_REMOTE_WORKDIRS = ("gs://",)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The TPU pod launcher's own options."""
  parser.add_argument("--tpu", required=True, help="The TPU VM's name.")
  parser.add_argument("--zone", required=True, help="Its zone, e.g. us-central2-b.")
  parser.add_argument("--project", help="Its project (default: gcloud's configured one).")
  parser.add_argument("--checkout", default="fm_adapt",
                      help="The fm_adapt checkout on every worker, relative to the worker's home "
                           "unless absolute (default: fm_adapt).")
  parser.add_argument("--detach", action="store_true",
                      help="Start under nohup and return at once (the run survives the ssh).")
  parser.add_argument("--allow_local_workdir", action="store_true",
                      help="Accept a --workdir not on gs://, for a mount all workers share.")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--dry_run", action="store_true",
                    help="Print the gcloud command, run nothing (the default).")
  mode.add_argument("--run", action="store_true", help="Run it.")


def _check_workdir(args: argparse.Namespace, fm_args: list[str]) -> None:
  workdir = command_lib.flag_value(fm_args, "workdir")
  if args.allow_local_workdir or workdir.startswith(_REMOTE_WORKDIRS):
    return
  raise command_lib.LaunchError(
      f"--workdir {workdir!r} would be on each worker's own disk, but the workers of a pod share "
      "one workdir (they write its checkpoints together). Use gs://BUCKET/..., or pass "
      "--allow_local_workdir if it is a mount every worker shares (NFS, Filestore).")


def remote_command(args: argparse.Namespace, job: str, fm_args: list[str]) -> str:
  """The shell command every worker runs: cd, environment, setup, fm_adapt into its log."""
  log = shlex.quote(f"{args.log_dir}/{job}-") + "$(hostname).log"
  steps = [f"cd {shlex.quote(args.checkout)}", f"mkdir -p {shlex.quote(args.log_dir)}",
           *command_lib.exports(command_lib.env_vars(args.env)), *args.setup]
  fm_adapt = command_lib.shell_line(args.python, fm_args)
  if args.detach:
    steps.append(f"(nohup {fm_adapt} > {log} 2>&1 < /dev/null &)")
  else:
    steps.append(f"{fm_adapt} > {log} 2>&1")
  return " && ".join(steps)


def gcloud_argv(args: argparse.Namespace, worker: str, command: str) -> list[str]:
  """`gcloud compute tpus tpu-vm ssh` of `command` on `worker` ('all' or an index)."""
  argv = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", args.tpu, "--zone", args.zone]
  if args.project:
    argv += ["--project", args.project]
  return argv + [f"--worker={worker}", "--command", command]


def _printed(argv: list[str]) -> str:
  """One copy-pasteable command, its --command on a line of its own."""
  head = argv.index("--command")
  return shlex.join(argv[:head]) + " \\\n    " + shlex.join(argv[head:])


def run(args: argparse.Namespace, fm_args: list[str]) -> int:
  """Prints the gcloud command; with --run, runs it.

  Returns:
    The exit status: 0 for a dry run, gcloud's otherwise.
  """
  _check_workdir(args, fm_args)
  job = command_lib.job_name(args.job_name, fm_args)
  argv = gcloud_argv(args, "all", remote_command(args, job, fm_args))
  logs = posixpath.join(args.checkout, args.log_dir, f"{job}-*.log")
  follow = gcloud_argv(args, "0", f"tail -f {logs}")
  if args.run and not shutil.which("gcloud"):
    raise command_lib.LaunchError(
        "gcloud is not on PATH: install the Google Cloud CLI "
        "(https://cloud.google.com/sdk/docs/install), or leave out --run.")
  print(_printed(argv))
  print(f"# Worker logs: {logs} on each worker. Follow worker 0's:")
  print("# " + shlex.join(follow))
  if not args.run:
    print("# Dry run: nothing ran. Pass --run to run it.", flush=True)
    return 0
  return subprocess.run(argv, check=False).returncode
