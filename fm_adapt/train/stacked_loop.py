"""Train and evaluate K runs that differ only in seed as one program (`stacked`).

  results = train_and_evaluate_stacked(configs, workdirs, data_dir, allow_harmless_changes)

Each run keeps its own workdir, written as `loop.train_and_evaluate` writes it: `config.json`,
`param_counts.*`, `metrics.jsonl` / `tb`, `best/` (its own best step by `best_metric`),
`predictions/`, `export/model.npz` and `results.json`; only the training checkpoints are shared:
one checkpoint of the stacked state and every seed's data-iterator state, in the group
directory (default `<parent of the first workdir>/stacked/<workdir names joined by '+'>`),
which also holds the group's `config.json` (the seeds' config, `seed` the list of seeds) and
lock. A killed group resumes from its newest readable checkpoint, exactly as a single run does.

Every step checks every seed's loss and parameter norm before anything is logged, evaluated or
saved. If one seed diverges, the whole group stops with `NonFiniteError` naming that seed's
workdir and step, and nothing of that step is saved for any seed (as a study stops at a run that
diverges); a resume meets the same step again, so change the config.

Costs (`costs.RunCosts`) are measured once for the group: each seed's `results.json` holds its
share, `step_time_s` and `wall_time_s` divided by K (comparable with a run trained alone), the
group's peak memory, and `stacked`: the seeds, the group directory and the group's own step and
wall times.

A seed workdir that holds checkpoints of a run trained alone is refused (`StackError`): finish
it alone, or start it afresh; so is a cached linear probe (`config.probe` other than
'end_to_end'), which trains apart. A group that stopped while writing the seeds' `results.json`
(some written, some not) is resumed by calling it with all of its seeds again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath
import jax
import ml_collections
import tqdm

from fm_adapt import config as config_lib
from fm_adapt.train import build
from fm_adapt.train import checkpoint as ckpt_lib
from fm_adapt.train import costs as costs_lib
from fm_adapt.train import files
from fm_adapt.train import finite
from fm_adapt.train import interrupt
from fm_adapt.train import loop
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import stacked
from fm_adapt.train import state as state_lib
from fm_adapt.train import workdir as workdir_lib
from fm_adapt.train import writer as writer_lib


class StackError(workdir_lib.WorkdirError):
  """The runs cannot train as one program (they differ beyond the seed, or a workdir holds a
  run trained alone)."""


@dataclasses.dataclass
class _Group:
  """The K runs of a stacked group and their per-seed objects, in seed order."""
  seeds: list[int]
  configs: list[ml_collections.ConfigDict]
  workdirs: list[epath.Path]
  runs: list[build.Run]
  ckpts: list[ckpt_lib.RunCheckpointer]  # Each seed's best checkpoint (in its workdir).
  ckpt: ckpt_lib.RunCheckpointer  # The stacked training checkpoints (in the group directory).
  writers: list[writer_lib.MetricWriter] = dataclasses.field(default_factory=list)
  axes: dict[str, int | None] = dataclasses.field(default_factory=dict)

  def data_state(self) -> dict[str, Any]:
    return {"base_checkpoint": self.runs[0].base_checkpoint, "seeds": self.seeds,
            "workdirs": [os.fspath(w) for w in self.workdirs]}


def default_group_dir(workdirs: Sequence[epath.PathLike]) -> epath.Path:
  """`<parent of the first workdir>/stacked/<workdir names joined by '+'>` (a name too long for
  a file system: the first name, the count and a hash of all of them)."""
  paths = [files.as_path(w) for w in workdirs]
  name = "+".join(p.name for p in paths)
  if len(name) > 200:
    digest = hashlib.sha256("\n".join(os.fspath(p) for p in paths).encode()).hexdigest()[:12]
    name = f"{paths[0].name[:100]}+{len(paths) - 1}_more_{digest}"
  return paths[0].parent / "stacked" / name


def check_stackable(configs: Sequence[ml_collections.ConfigDict],
                    workdirs: Sequence[epath.PathLike]) -> list[int]:
  """The seeds of runs that may train as one program; a clear error otherwise.

  Raises:
    StackError: no runs, a config that differs from the first beyond `seed` (naming the keys),
      repeated seeds or workdirs, a cached linear probe.
  """
  if not configs or len(configs) != len(workdirs):
    raise StackError(f"Stacking needs one workdir per config; got {len(configs)} configs and "
                     f"{len(workdirs)} workdirs.")
  seeds = [int(c.get("seed", 0)) for c in configs]
  if len(set(seeds)) != len(seeds):
    raise StackError(f"The stacked runs repeat a seed: {seeds}; give each run its own seed.")
  paths = [os.fspath(files.as_path(w)) for w in workdirs]
  if len(set(paths)) != len(paths):
    raise StackError(f"The stacked runs repeat a workdir: {paths}.")
  probe = config_lib.check_probe(configs[0].get("probe"))
  if probe != "end_to_end":
    raise StackError(f"config.probe={probe!r} (a head trained on cached features) trains each "
                     "seed apart: run it without --stack_seeds.")
  for config, path in zip(configs[1:], paths[1:]):
    training, harmless, defaulted = workdir_lib.config_differences(configs[0], config)
    other = [l for l in training + harmless + defaulted if not l.startswith("seed:")]
    if other:
      raise StackError(f"Only runs that differ in seed alone train as one program; the run "
                       f"of {path} differs from that of {paths[0]} in:\n  " + "\n  ".join(other)
                       + "\nTrain them apart (without --stack_seeds).")
  return seeds


def _group_config(config: ml_collections.ConfigDict, seeds: list[int]
                  ) -> ml_collections.ConfigDict:
  """The group's config for its `config.json`: the seeds' config, `seed` the list of seeds."""
  return ml_collections.ConfigDict(dict(config.to_dict(), seed=list(seeds)))


def trained_alone(workdir: epath.PathLike) -> bool:
  """Whether a workdir holds training checkpoints of its own (a run started alone), which a
  group does not resume: such a run is finished alone."""
  ckpt = files.as_path(workdir) / "ckpt"
  return ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir())


def _check_no_single_progress(workdirs: Sequence[epath.Path]) -> None:
  for workdir in workdirs:
    if trained_alone(workdir):
      raise StackError(
          f"{workdir} holds checkpoints of a run trained alone ({workdir / 'ckpt'}): finish it "
          "alone (without --stack_seeds), or delete the workdir to train it with its group.")


def _check_same_schedule(group: _Group) -> None:
  first = group.runs[0]
  for run, workdir in zip(group.runs[1:], group.workdirs[1:]):
    mine = (run.total_steps, run.steps_per_epoch, run.batch_size, run.num_train_examples)
    theirs = (first.total_steps, first.steps_per_epoch, first.batch_size,
              first.num_train_examples)
    if mine != theirs:
      raise StackError(f"The run of {workdir} has (total steps, steps per epoch, batch, train "
                       f"examples) {mine}, the first run {theirs}: seeds whose training data "
                       "differ in size cannot train as one program; train them apart.")


def train_and_evaluate_stacked(configs: Sequence[ml_collections.ConfigDict],
                               workdirs: Sequence[epath.PathLike], data_dir: str | None = None,
                               allow_harmless_changes: bool = False,
                               group_dir: epath.PathLike | None = None) -> list[dict[str, Any]]:
  """Trains, evaluates and tests K runs that differ only in seed as one program.

  Args:
    configs: the runs' configs, equal but for `seed`.
    workdirs: each run's directory, as `loop.train_and_evaluate` takes it.
    data_dir: data directory flag (else config.data_dir, FM_ADAPT_DATA_DIR, the cache dir).
    allow_harmless_changes: on resume, accept changes of `workdir.HARMLESS_KEYS`.
    group_dir: where the stacked checkpoints go (default `default_group_dir(workdirs)`).

  Returns:
    Each run's `results.json` (also written in its workdir), in the order of `configs`.

  Raises:
    StackError: runs that differ beyond the seed, or a workdir with a run trained alone.
    workdir.WorkdirBusy, workdir.ConfigChanged: as `loop.train_and_evaluate`, for any workdir
      or the group directory.
    NonFiniteError: a seed reached a non-finite state (nothing of that step saved).
  """
  for config in configs:
    config_lib.validate(config)
  seeds = check_stackable(configs, workdirs)
  paths = [files.as_path(w) for w in workdirs]
  group_path = files.as_path(group_dir) if group_dir is not None else default_group_dir(paths)
  for path in [group_path, *paths]:
    workdir_lib.check_storage(path)
  first = loop.start_processes()
  with contextlib.ExitStack() as locks:
    for path in [group_path, *paths]:
      locks.enter_context(workdir_lib.lock(path, owner=first))
    _check_no_single_progress(paths)
    workdir_lib.check_config(group_path, _group_config(configs[0], seeds),
                             allow_harmless_changes, write=first)
    for config, path in zip(configs, paths):
      workdir_lib.check_config(path, config, allow_harmless_changes, write=first)
    results = _train_group(list(configs), paths, group_path, seeds, data_dir)
    if first:  # All evaluated before any is written: a group is finished or not.
      for path, result in zip(paths, results):
        files.write_json(path / "results.json", result)
  return results


def _train_group(configs: list[ml_collections.ConfigDict], paths: list[epath.Path],
                 group_path: epath.Path, seeds: list[int], data_dir: str | None
                 ) -> list[dict[str, Any]]:
  runs = [build.build_run(c, data_dir or c.get("data_dir")) for c in configs]
  costs = costs_lib.RunCosts()
  best_metric = configs[0].get("best_metric", "val/auc")
  for run in runs:
    loop._check_best_metric(best_metric, run)  # pylint: disable=protected-access
  keep = configs[0].get("keep_ckpts", 2)
  group = _Group(seeds, configs, paths, runs,
                 [ckpt_lib.RunCheckpointer(p, keep=keep, best_metric=best_metric) for p in paths],
                 ckpt_lib.RunCheckpointer(group_path, keep=keep, best_metric=None))
  try:
    _check_same_schedule(group)
    iterator = stacked.StackedIterator([iter(r.train_loader) for r in runs], seeds)
    state, start = _restore_or_init(group, iterator)
    costs.resumed_from_step = start
    mesh = runs[0].mesh
    update = stacked.jit_stacked_update(runs[0].update_fn, state, group.axes, mesh)
    rngs = jax.device_put(stacked.vmap_exact_keys([r.rng for r in runs]),
                          mesh_lib.replicated(mesh))
    group.writers = [writer_lib.MetricWriter(p, resume_step=start) for p in paths]
    state = _train(group, update, rngs, state, iterator, start, costs.step_timer)
    results = [loop._final_results(  # pylint: disable=protected-access
        config, run, ckpt, path, stacked.unstack_state(state, group.axes, k))
               for k, (config, run, ckpt, path) in enumerate(zip(configs, runs, group.ckpts,
                                                                 paths))]
    shares = _seed_costs(costs.fields(), group)
    return [dict(result, **shares) for result in results]
  finally:
    for ckpt in [group.ckpt, *group.ckpts]:
      ckpt.wait()
      ckpt.close()
    for writer in group.writers:
      writer.close()


def _seed_costs(fields: Mapping[str, Any], group: _Group) -> dict[str, Any]:
  """Each seed's share of the group's costs: times divided by K; the group's own beside."""
  count = len(group.seeds)
  share = lambda value: None if value is None else value / count
  return dict(fields, step_time_s=share(fields["step_time_s"]),
              wall_time_s=share(fields["wall_time_s"]),
              stacked={"seeds": group.seeds, "group_dir": os.fspath(group.ckpt.directory.parent),
                       "group_step_time_s": fields["step_time_s"],
                       "group_wall_time_s": fields["wall_time_s"]})


def _restore_or_init(group: _Group, iterator: stacked.StackedIterator
                     ) -> tuple[dict[str, Any], int]:
  """The newest readable group checkpoint (the seeds' iterator states set on `iterator`), else
  the seeds' fresh states stacked; sets `group.axes`."""
  states = [run.init_state() for run in group.runs]
  for path, state in zip(group.workdirs, states):
    loop._write_param_counts(path, state)  # pylint: disable=protected-access
  state, group.axes = stacked.stack_states(states)
  del states

  def check(step: int, restored: Mapping[str, Any], data_state: Mapping[str, Any]) -> None:
    loop._check_same_base(  # pylint: disable=protected-access
        data_state.get("base_checkpoint"), group.runs[0].base_checkpoint)
    if data_state.get("seeds") != group.seeds:
      raise ckpt_lib.IncompatibleCheckpoint(
          f"The checkpoint {group.ckpt.directory}/{step} holds the seeds "
          f"{data_state.get('seeds')}, this group {group.seeds}: use its own group directory.")
    finite.check_tree({k: restored[k] for k in ("params", "model_state")},
                      f"The stacked checkpoint of step {step}")

  found = group.ckpt.restore_latest(ckpt_lib.abstract_of(state_lib.checkpointed(state)), check,
                                    iterator)
  if found is None:
    return state, 0
  restored, _, step = found
  writer_lib.console(f"Resuming the seeds {group.seeds} from {group.ckpt.directory}/{step}")
  return dict(restored, frozen=state["frozen"]), int(step)


def _train(group: _Group, update, rngs, state, iterator, start: int,
           step_timer: costs_lib.StepTimer) -> dict[str, Any]:
  """Trains steps `start + 1 .. total` of every seed; returns the final stacked state."""
  config, run = group.configs[0], group.runs[0]
  bar = tqdm.tqdm(total=run.total_steps, initial=start, unit="step", dynamic_ncols=True,
                  disable=not config.get("progress", True) or jax.process_index() != 0)
  with interrupt.StopOnSignal() as stop:
    try:
      return _train_steps(group, update, rngs, state, iterator, start, bar, stop, step_timer)
    finally:
      for writer in group.writers:
        writer.flush()
      bar.close()


class _SeedBar:
  """The group's progress bar as one seed's: its lines and postfix named by the seed."""

  def __init__(self, bar: Any, seed: int, postfix: dict[str, Any]):
    self._bar, self._seed, self._postfix = bar, seed, postfix

  def write(self, message: str) -> None:
    self._bar.write(f"seed {self._seed}: {message}")

  def set_postfix(self, **values: Any) -> None:
    self._postfix.update({f"{k}_s{self._seed}": v for k, v in values.items()})
    self._bar.set_postfix(self._postfix)


def _seed_measurements(measurements: Mapping[str, Any]) -> list[dict[str, Any]]:
  """The [K] measurements of a stacked step as K dicts of host scalars."""
  host = jax.device_get(measurements)
  count = len(next(iter(host.values())))
  return [{name: values[k] for name, values in host.items()} for k in range(count)]


def _check_finite(group: _Group, step: int, measurements: Mapping[str, Any]) -> None:
  """`loop._check_finite` for every seed; the error names the seed and the group."""
  for seed, path, values in zip(group.seeds, group.workdirs, _seed_measurements(measurements)):
    try:
      loop._check_finite(step, values, group.ckpt, path)  # pylint: disable=protected-access
    except finite.NonFiniteError as error:
      raise finite.NonFiniteError(
          f"{error} Seed {seed} trained as one program with the seeds {group.seeds} (group "
          f"checkpoints in {group.ckpt.directory}): the group stops, and no seed's state of "
          f"step {step} was saved.") from None


def _train_steps(group: _Group, update, rngs, state, iterator, start: int, bar,
                 stop: interrupt.StopOnSignal, step_timer: costs_lib.StepTimer
                 ) -> dict[str, Any]:
  """`loop._train_steps` for the stacked state: steps, checks every seed, logs and evaluates
  each seed in its workdir, saves the group checkpoint; a stop request saves and raises. Steps
  are timed as there (`step_timer`), a step being one step of every seed."""
  config, run = group.configs[0], group.runs[0]
  total = run.total_steps
  cadence = loop.Cadence.of(config, run)
  postfix: dict[str, Any] = {}
  bars = [_SeedBar(bar, seed, postfix) for seed in group.seeds]
  timers = [(time.perf_counter(), start)] * len(group.seeds)
  previous = None  # (step, measurements) of the step before.
  for step in range(start + 1, total + 1):
    batch = stacked.stacked_batch(next(iterator), run.mesh)
    state, measurements = update(state, rngs, batch)
    if previous is not None:
      _check_finite(group, *previous)
      step_timer.done(previous[0])
    previous = (step, measurements)
    bar.update(1)
    stopping, log, evaluate, save = cadence.actions(step, total, stop)
    if stopping or log or evaluate or save:
      _check_finite(group, step, measurements)
      step_timer.done(step)
    if log or stopping:
      for k, values in enumerate(_seed_measurements(measurements)):
        timers[k] = loop._log_train(  # pylint: disable=protected-access
            step, values, timers[k], group.runs[k], group.writers[k], bars[k])
    if evaluate:  # Also when stopping: a resume starts after this step and must not skip it.
      for k in range(len(group.seeds)):
        loop._evaluate_periodic(  # pylint: disable=protected-access
            step, stacked.unstack_state(state, group.axes, k), group.runs[k], group.ckpts[k],
            group.writers[k], bars[k], group.workdirs[k])
    if stopping:
      group.ckpt.save(step, state_lib.checkpointed(state), group.data_state(), iterator)
      group.ckpt.wait()
      raise interrupt.Stopped(step, stop.signum)
    if save:
      group.ckpt.save(step, state_lib.checkpointed(state), group.data_state(), iterator)
    if evaluate or save:
      step_timer.pause()  # The next step's interval holds the evaluation or the save.
  return state
