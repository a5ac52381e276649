"""SLURM: an sbatch script that runs one fm_adapt process per node, and its submission.

  python -m launch slurm --nodes 2 --gpus_per_node 8 --time 04:00:00 [--partition gpu] \
      [--env FM_ADAPT_DATA_DIR=/shared/data] [--submit] -- fm_adapt.main --config ... --workdir ...

The script asks for `--ntasks-per-node=1` and `srun`s `<python> -m <command> --multihost` on
every node: JAX reads the job from SLURM's variables (process id from SLURM_PROCID, count from
SLURM_NTASKS, coordinator on the first node of SLURM_STEP_NODELIST). What else it sets, and why:

- `JAX_LOCAL_DEVICE_IDS=0,..,G-1`: JAX's SLURM detection otherwise gives each process only the
  GPU numbered SLURM_LOCALID (one process per GPU); here one process drives all G GPUs.
- `--signal=TERM@S`: SIGTERM S seconds before the time limit, so fm_adapt checkpoints the step
  it stopped at (SLURM's own SIGTERM at the limit leaves only KillWait, often 30 s).
- `srun --kill-on-bad-exit=1`: a process that fails ends the others, instead of leaving them
  waiting in a collective until the time limit.
- `--output` of srun with %N: one log per node, `<log_dir>/<job>-<jobid>-<node>.log`; the batch
  script's own output (srun's errors) goes to `<log_dir>/<job>-<jobid>.log`.

The default is a dry run: the script is written (to `<chdir>/<log_dir>/<job>.sbatch`) and
printed with the sbatch command, nothing is submitted; `--submit` runs sbatch.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys

from launch import command as command_lib

# SLURM's --time formats: MINUTES, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS.
_TIME = re.compile(r"\d+(:\d{1,2}){0,2}|\d+-\d{1,2}(:\d{1,2}){0,2}")
_PARTITION = re.compile(r"[A-Za-z0-9._,-]+")
_SBATCH_OPTION = re.compile(r"([a-z][a-z-]*)(=\S+)?")
# Options the launcher writes itself; --sbatch may not repeat them.
_OWN_OPTIONS = ("job-name", "nodes", "ntasks-per-node", "gpus-per-node", "time", "partition",
                "cpus-per-task", "chdir", "output", "signal", "ntasks")


def _count(minimum: int):
  def parse(text: str) -> int:
    try:
      value = int(text)
    except ValueError:
      raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
      raise argparse.ArgumentTypeError(f"must be at least {minimum} (got {value})")
    return value
  return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """The SLURM launcher's own options."""
  parser.add_argument("--nodes", type=_count(1), required=True,
                      help="Nodes; one fm_adapt process runs on each.")
  parser.add_argument("--gpus_per_node", type=_count(0), required=True,
                      help="GPUs per node, all driven by the node's one process (0: CPU only).")
  parser.add_argument("--time", required=True,
                      help="Time limit: MINUTES, HH:MM:SS or D-HH:MM:SS.")
  parser.add_argument("--partition", help="Partition (default: the cluster's).")
  parser.add_argument("--cpus_per_task", type=_count(1),
                      help="CPUs for each node's process (data loading workers); default: the "
                           "cluster's, often 1.")
  parser.add_argument("--signal_before", type=_count(0), default=120, metavar="SECONDS",
                      help="Send SIGTERM this long before the time limit so the run checkpoints "
                           "(0: only SLURM's own at the limit). Default 120.")
  parser.add_argument("--sbatch", action="append", default=[], metavar="NAME[=VALUE]",
                      help="Another #SBATCH option, e.g. --sbatch account=my-lab (repeatable).")
  parser.add_argument("--chdir", default=os.getcwd(),
                      help="The fm_adapt checkout on the nodes (default: this directory).")
  parser.add_argument("--script", help="Where to write the script (default: "
                                       "<chdir>/<log_dir>/<job_name>.sbatch).")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--dry_run", action="store_true",
                    help="Write and print the script and the sbatch command (the default).")
  mode.add_argument("--submit", action="store_true", help="Also submit it with sbatch.")


def _check(args: argparse.Namespace) -> None:
  if not _TIME.fullmatch(args.time):
    raise command_lib.LaunchError(
        f"--time {args.time!r} is not a SLURM time: give MINUTES, HH:MM:SS or D-HH:MM:SS, "
        "e.g. --time 04:00:00.")
  if args.partition is not None and not _PARTITION.fullmatch(args.partition):
    raise command_lib.LaunchError(f"--partition {args.partition!r} is not a partition name "
                                  "(letters, digits, '.', '_', '-', ',' for several).")
  for path, flag in ((args.chdir, "--chdir"), (args.log_dir, "--log_dir")):
    if re.search(r"\s", path):
      raise command_lib.LaunchError(f"{flag} {path!r} has whitespace, which an #SBATCH line "
                                    f"cannot hold: use a path without spaces.")
  for option in args.sbatch:
    match = _SBATCH_OPTION.fullmatch(option)
    if not match:
      raise command_lib.LaunchError(f"--sbatch {option!r} is not NAME or NAME=VALUE without "
                                    "spaces or leading dashes, e.g. --sbatch account=my-lab.")
    if match.group(1) in _OWN_OPTIONS:
      raise command_lib.LaunchError(
          f"--sbatch {option!r}: the launcher writes --{match.group(1)} itself; use its own "
          "option (--nodes, --gpus_per_node, --time, --partition, --cpus_per_task, --chdir, "
          "--log_dir, --job_name, --signal_before).")


def script(args: argparse.Namespace, job: str, fm_args: list[str]) -> str:
  """The sbatch script's text.

  Args:
    args: the launcher's options (add_arguments and the shared ones).
    job: the job's name.
    fm_args: the checked fm_adapt command (command.fm_adapt_args).
  """
  directives = [f"--job-name={job}", f"--nodes={args.nodes}", "--ntasks-per-node=1"]
  if args.gpus_per_node:
    directives.append(f"--gpus-per-node={args.gpus_per_node}")
  directives.append(f"--time={args.time}")
  if args.partition:
    directives.append(f"--partition={args.partition}")
  if args.cpus_per_task:
    directives.append(f"--cpus-per-task={args.cpus_per_task}")
  directives += [f"--chdir={args.chdir}", f"--output={args.log_dir}/%x-%j.log"]
  if args.signal_before:
    directives.append(f"--signal=TERM@{args.signal_before}")
  directives += [f"--{option}" for option in args.sbatch]
  lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives),
           f"# fm_adapt on {args.nodes} node(s), one process each; JAX finds the job from SLURM "
           "(--multihost).", "set -e"]
  if args.gpus_per_node:
    lines += ["# Each process drives all GPUs of its node (JAX's SLURM detection would give it "
              "only GPU $SLURM_LOCALID).",
              "export JAX_LOCAL_DEVICE_IDS=" + ",".join(map(str, range(args.gpus_per_node)))]
  lines += command_lib.exports(command_lib.env_vars(args.env)) + list(args.setup)
  srun = ["srun", "--kill-on-bad-exit=1", f"--output={args.log_dir}/%x-%j-%N.log"]
  if args.cpus_per_task:  # SLURM 22.05 to 23.02: a step does not inherit the job's value.
    srun.insert(1, f"--cpus-per-task={args.cpus_per_task}")
  lines.append(shlex.join(srun) + " " + command_lib.shell_line(args.python, fm_args))
  return "\n".join(lines) + "\n"


def _shown(path: str) -> str:
  """`path` relative to this directory when it lies below it, else as is."""
  relative = os.path.relpath(path)
  return path if relative.startswith("..") else relative


def run(args: argparse.Namespace, fm_args: list[str]) -> int:
  """Writes the script, prints it and the sbatch command; with --submit, runs sbatch.

  Returns:
    The exit status: 0 for a dry run, sbatch's otherwise.
  """
  _check(args)
  args.chdir = os.path.abspath(args.chdir)
  job = command_lib.job_name(args.job_name, fm_args)
  text = script(args, job, fm_args)
  log_dir = os.path.join(args.chdir, args.log_dir)
  path = args.script or os.path.join(log_dir, f"{job}.sbatch")
  if args.submit and not shutil.which("sbatch"):
    raise command_lib.LaunchError("sbatch is not on PATH: run this on a SLURM login node, or "
                                  "leave out --submit and copy the written script there.")
  os.makedirs(log_dir, exist_ok=True)  # SLURM does not create the directory of --output.
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w") as f:
    f.write(text)
  submit = shlex.join(["sbatch", _shown(path)])
  print(text)
  print(f"# Node logs: {os.path.join(_shown(log_dir), job)}-<jobid>-<node>.log")
  if not args.submit:
    print(f"# Dry run: wrote {_shown(path)}, submitted nothing. Submit with (or pass --submit):")
    print(submit, flush=True)
    return 0
  print(submit, flush=True)
  return subprocess.run(["sbatch", path], check=False).returncode
