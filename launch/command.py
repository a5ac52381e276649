"""The fm_adapt command a launcher starts on every host: checked, given `--multihost`, quoted.

The command is what follows `--` on the launcher's command line, module first:

  fm_adapt.main --config experiments/medmnist_v2.py:dataset=retinamnist --workdir gs://b/run

Every host runs `<python> -m <that command> --multihost`: one process per host, and JAX's
cluster detection (SLURM, Cloud TPU pods) gives each its process id, the process count and the
coordinator address, so the explicit join flags are refused here.
"""
from __future__ import annotations

import posixpath
import re
import shlex
from collections.abc import Sequence

MODULES = ("fm_adapt.main", "fm_adapt.study")
REQUIRED_FLAGS = ("config", "workdir")
# Explicit join flags: they would override what JAX detects from the cluster, for every host alike.
JOIN_FLAGS = ("coordinator_address", "num_processes", "process_id")
MULTIHOST = "--multihost"
EXAMPLE = ("-- fm_adapt.main --config experiments/medmnist_v2.py:dataset=retinamnist "
           "--workdir gs://my-bucket/retina")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class LaunchError(ValueError):
  """Bad launcher input; the message says how to fix it."""


def _flag_name(token: str) -> str | None:
  """'--workdir=x' -> 'workdir'; None for a token that is not a flag."""
  if not token.startswith("-") or token in ("-", "--"):
    return None
  return token.lstrip("-").split("=", 1)[0]


def flag_value(args: Sequence[str], name: str) -> str | None:
  """The value of `--name=V` or `--name V` in `args` (absl's two spellings), else None."""
  for i, token in enumerate(args):
    if _flag_name(token) != name:
      continue
    if "=" in token:
      return token.split("=", 1)[1]
    return args[i + 1] if i + 1 < len(args) else ""
  return None


def _check_module(module: str) -> None:
  if module in MODULES:
    return
  if module.startswith("python") or module == "-m":
    fix = "give the module without the interpreter (the launcher adds `<python> -m`)"
  elif module.endswith(".py"):
    fix = "give the module name, not a file path"
  else:
    fix = "give one of them first"
  raise LaunchError(f"Unknown fm_adapt module {module!r} after --: the launcher runs "
                    f"{' or '.join(MODULES)}; {fix}, e.g. `{EXAMPLE}`.")


def _check_flags(flags: Sequence[str]) -> None:
  for name in REQUIRED_FLAGS:
    if not flag_value(flags, name):
      raise LaunchError(f"The fm_adapt command has no --{name}: every host needs it, e.g. "
                        f"`{EXAMPLE}`.")
  for token in flags:
    name = _flag_name(token)
    if name in JOIN_FLAGS:
      raise LaunchError(
          f"Remove {token.split('=', 1)[0]} from the fm_adapt command: the launcher starts every "
          "host with --multihost, and JAX takes the coordinator, process count and process id "
          "from the cluster. The explicit join flags are for processes started by hand.")
    if name in ("multihost", "nomultihost") and token != MULTIHOST:
      raise LaunchError(f"Remove {token!r} from the fm_adapt command: the launcher adds "
                        f"{MULTIHOST} itself.")


def fm_adapt_args(argv: Sequence[str]) -> list[str]:
  """Checks the command given after `--` and returns it with `--multihost` (added once).

  Args:
    argv: module and flags, e.g. ['fm_adapt.main', '--config', 'f.py:a=1,b=2', '--workdir', 'w'].

  Returns:
    The arguments to put after `<python> -m` on every host.

  Raises:
    LaunchError: no command, an unknown module, a missing --config / --workdir, or a flag the
      launcher controls.
  """
  if not argv:
    raise LaunchError(f"No fm_adapt command: put it after --, e.g. `{EXAMPLE}`.")
  module, *flags = argv
  _check_module(module)
  _check_flags(flags)
  if MULTIHOST not in flags:
    flags.append(MULTIHOST)
  return [module, *flags]


def job_name(name: str | None, args: Sequence[str]) -> str:
  """The run's name: `name` if given, else the last component of the command's --workdir.

  Raises:
    LaunchError: a name that is not letters, digits, '.', '_', '-' (it names jobs and log files).
  """
  given = name is not None
  if not given:
    name = posixpath.basename(flag_value(args, "workdir").rstrip("/"))
  if not _NAME.fullmatch(name or ""):
    where = "--job_name" if given else f"the --workdir's last component {name!r}"
    raise LaunchError(f"{where} cannot name the job and its logs: use letters, digits, '.', '_' "
                      "and '-' only (pass --job_name NAME).")
  return name


def shell_line(python: str, args: Sequence[str]) -> str:
  """`<python> -m <args>` as one shell line, every argument quoted with `shlex.quote`."""
  return shlex.join([python, "-m", *args])


_ENV_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_vars(pairs: Sequence[str]) -> list[tuple[str, str]]:
  """Parses repeated `--env KEY=VALUE` options, in order.

  Raises:
    LaunchError: an entry without '=', a key that is not a shell variable name, a key given twice.
  """
  parsed: dict[str, str] = {}
  for pair in pairs:
    key, sep, value = pair.partition("=")
    if not sep or not _ENV_KEY.fullmatch(key):
      raise LaunchError(f"--env {pair!r} is not KEY=VALUE with KEY a shell variable name, e.g. "
                        "--env FM_ADAPT_DATA_DIR=/shared/data.")
    if key in parsed:
      raise LaunchError(f"--env {key} is given twice ({parsed[key]!r} and {value!r}); keep one.")
    parsed[key] = value
  return list(parsed.items())


def exports(env: Sequence[tuple[str, str]]) -> list[str]:
  """`export KEY=VALUE` lines, each value quoted (taken literally: no `$VAR` expansion)."""
  return [f"export {key}={shlex.quote(value)}" for key, value in env]
