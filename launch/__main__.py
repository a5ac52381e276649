"""`python -m launch <slurm|tpu> [options] -- <fm_adapt module> <flags>`; see `launch`."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import launch
from launch import command as command_lib
from launch import slurm
from launch import tpu_pod

LAUNCHERS = {"slurm": slurm, "tpu": tpu_pod}


def _add_shared_arguments(parser: argparse.ArgumentParser) -> None:
  parser.add_argument("--job_name",
                      help="Names the job and its logs (default: the --workdir's last component).")
  parser.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                      help="An environment variable for every process, e.g. "
                           "FM_ADAPT_DATA_DIR=/shared/data (repeatable; VALUE taken literally).")
  parser.add_argument("--setup", action="append", default=[], metavar="SHELL",
                      help="A shell line run before fm_adapt on every host, e.g. "
                           "'source ~/venv/bin/activate' (repeatable).")
  parser.add_argument("--python", default="python3",
                      help="The Python that runs fm_adapt on the hosts (default: python3).")
  parser.add_argument("--log_dir", default="logs",
                      help="Log directory, relative to the checkout unless absolute "
                           "(default: logs).")


def build_parser() -> argparse.ArgumentParser:
  """The launcher's parser: one sub-command per launcher."""
  parser = argparse.ArgumentParser(
      prog="python -m launch", description=launch.__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter,
      epilog=f"The fm_adapt command goes after --, e.g. {command_lib.EXAMPLE}")
  subparsers = parser.add_subparsers(dest="launcher", required=True, metavar="{slurm,tpu}")
  for name, module in LAUNCHERS.items():
    sub = subparsers.add_parser(name, help=module.__doc__.splitlines()[0],
                                description=module.__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(sub)
    _add_shared_arguments(sub)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Parses the launcher's options and the fm_adapt command after `--`, and launches.

  Returns:
    The exit status (bad input exits with status 2 and a message naming the fix).
  """
  argv = list(sys.argv[1:] if argv is None else argv)
  split = argv.index("--") if "--" in argv else len(argv)
  own, fm_adapt = argv[:split], argv[split + 1:]
  parser = build_parser()
  args, unknown = parser.parse_known_args(own)
  if unknown:
    parser.error(f"unrecognized arguments: {' '.join(unknown)} (the fm_adapt command goes after "
                 f"--, e.g. {command_lib.EXAMPLE})")
  try:
    return LAUNCHERS[args.launcher].run(args, command_lib.fm_adapt_args(fm_adapt))
  except command_lib.LaunchError as error:
    parser.exit(2, f"python -m launch {args.launcher}: error: {error}\n")


if __name__ == "__main__":
  sys.exit(main())
