"""Train and evaluate one run config in a workdir: resumable, sharded, logged, checked.

Resume order: the workdir's own checkpoint, then `config.model_init` (pretrained), then scratch.
A workdir is trained by one process at a time with one config (`workdir.lock`,
`workdir.check_config`). No state is persisted (checkpoint, best, export) unless its loss and
parameter norm are known finite; a resume starts from the newest checkpoint that reads back.
The workdir is a local path or a `gs://` URI: every path below it is an `etils.epath.Path`.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from data_pipelines import coordination
from fm_adapt import config as config_lib
from fm_adapt import param_paths
from fm_adapt.weights import native
from fm_adapt.evaluators import classification as cls_eval
from fm_adapt.train import checkpoint as ckpt_lib
from fm_adapt.train import costs as costs_lib
from fm_adapt.train import files
from fm_adapt.train import finite
from fm_adapt.train import interrupt
from fm_adapt.train import linear_probe
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import processes
from fm_adapt.train import build
from fm_adapt.train import state as state_lib
from fm_adapt.train import step as step_lib
from fm_adapt.train import workdir as workdir_lib
from fm_adapt.train import writer as writer_lib

NonFiniteError = finite.NonFiniteError
# Errors whose message says what happened and what to do: the command line prints them without
# a traceback.
REFUSALS = (workdir_lib.WorkdirError, finite.NonFiniteError, ckpt_lib.CheckpointError,
            ckpt_lib.IncompatibleCheckpoint, processes.JoinError,
            coordination.PrepareTimeoutError, coordination.PrepareFailedError,
            linear_probe.NotEligible)


def _data_state(run: build.Run) -> dict[str, Any]:
  """What a checkpoint records beside the state: the base checkpoint the run adapts."""
  return {"base_checkpoint": run.base_checkpoint}


def _evaluate(evaluators: Mapping[str, cls_eval.Evaluator], state: Mapping[str, Any],
              names: list[str] | None = None,
              predictions_dir: epath.Path | None = None, workdir: epath.Path | None = None,
              step: int | None = None) -> dict[str, float | None]:
  """Runs the evaluators (those in `names`; all for None) on `state`; {'<name>/<metric>': value}.

  With `predictions_dir` (the final evaluation) each writes its predictions there; with
  `workdir`, evaluators that write files of their own (`WRITES_FILES`) get `workdir`, `step` and
  `final` (whether this is the final evaluation).
  """
  out = {}
  for name, evaluator in evaluators.items():
    if names is None or name in names:
      kwargs = {} if predictions_dir is None else {
          "predictions_path": predictions_dir / f"{name}.csv"}
      if workdir is not None and getattr(evaluator, "WRITES_FILES", False):
        kwargs.update(workdir=workdir, step=step, final=predictions_dir is not None)
      out.update({f"{name}/{k}": v for k, v in evaluator.run(state, **kwargs)})
  return out


def start_processes() -> bool:
  """Starts JAX's multi-process runtime where the environment asks for it; True on process 0."""
  mesh_lib.maybe_initialize_distributed()  # Once per process: later calls do nothing.
  return jax.process_index() == 0


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: epath.PathLike,
                       data_dir: str | None = None, allow_harmless_changes: bool = False
                       ) -> dict[str, Any]:
  """Trains, evaluates and tests one run; returns (and writes) `results.json`.

  Beside the metrics, `results.json` records the training subset (`label_fraction`,
  `num_train_examples`, `train_class_counts`) and the run's costs (`costs.RunCosts.fields`:
  `step_time_s`, `timed_steps`, `resumed_from_step`, `wall_time_s`, `peak_memory_bytes`,
  `peak_memory_source`, `peak_memory_upper_bound`).

  Args:
    config: the run config (see `fm_adapt.config.RUN_KEYS`).
    workdir: the run's directory (a local path or a `gs://` URI); an existing checkpoint there
      is resumed.
    data_dir: data directory flag (else config.data_dir, FM_ADAPT_DATA_DIR, the cache dir).
    allow_harmless_changes: on resume, accept changes of `workdir.HARMLESS_KEYS`.

  Raises:
    workdir.WorkdirError: a workdir on storage a run cannot use, or without the packages that
      reach it (`workdir.check_storage`).
    workdir.WorkdirBusy: another process trains in `workdir`.
    workdir.ConfigChanged: a resume whose config differs from `<workdir>/config.json`.
    NonFiniteError: training reached a non-finite state (not saved).
  """
  config_lib.validate(config)
  workdir = files.as_path(workdir)
  workdir_lib.check_storage(workdir)
  first = start_processes()
  with workdir_lib.lock(workdir, owner=first):
    workdir_lib.check_config(workdir, config, allow_harmless_changes, write=first)
    run = build.build_run(config, data_dir or config.get("data_dir"))
    costs = costs_lib.RunCosts()  # The wall time holds a cached probe's feature extraction.
    run = _select_probe(config, run, data_dir or config.get("data_dir"))
    best_metric = config.get("best_metric", "val/auc")
    _check_best_metric(best_metric, run)
    ckpt = ckpt_lib.RunCheckpointer(workdir, keep=config.get("keep_ckpts", 2),
                                    best_metric=best_metric)
    writer = None
    try:
      iterator = iter(run.train_loader)
      state, start = _restore_or_init(run, ckpt, iterator)
      costs.resumed_from_step = start
      _write_param_counts(workdir, state)
      update_fn = step_lib.jit_update(run.update_fn, state, run.mesh)
      writer = writer_lib.MetricWriter(workdir, resume_step=start)
      state = _train(config, run, update_fn, state, iterator, ckpt, writer, start, workdir,
                     step_timer=costs.step_timer)
      results = _final_results(config, run, ckpt, workdir, state)
      results.update(costs.fields())
    finally:
      ckpt.wait()
      ckpt.close()
      if writer is not None:
        writer.close()
    if first:
      files.write_json(workdir / "results.json", results)
  return results


def _select_probe(config: ml_collections.ConfigDict, run: build.Run, data_dir: str | None
                  ) -> build.Run:
  """`config.probe`: 'end_to_end' (default) trains as configured; 'cached' trains the head on
  features computed once (`linear_probe.cached_run`), and an ineligible config is an error
  naming why; 'auto' caches where eligible, else trains end to end with a line saying why."""
  probe = config_lib.check_probe(config.get("probe"))
  if probe == "end_to_end":
    return run
  try:
    return linear_probe.cached_run(config, run, data_dir)
  except linear_probe.NotEligible as error:
    if probe == "cached":
      raise
    writer_lib.console(f"config.probe='auto': training end to end. {error}")
    return run


def _check_best_metric(metric: str | None, run: build.Run) -> None:
  """`best_metric` must name a periodic evaluator (when there are any), before training."""
  if metric and run.periodic_evals and metric.split("/")[0] not in run.periodic_evals:
    raise ValueError(
        f"config.best_metric={metric!r} names no evaluator that runs during training; those are "
        f"{run.periodic_evals} (metrics such as '{run.periodic_evals[0]}/auc').")


def _restore_or_init(run: build.Run, ckpt: ckpt_lib.RunCheckpointer, iterator: Any
                     ) -> tuple[dict[str, Any], int]:
  """The newest readable workdir checkpoint (its iterator state set on `iterator`), else a fresh
  state.

  A checkpoint that does not read back, holds non-finite values or an iterator state the loader
  refuses is skipped for the next older kept step (`RunCheckpointer.restore_latest`).
  """
  state = run.init_state()

  def check(step: int, restored: Mapping[str, Any], data_state: Mapping[str, Any]) -> None:
    _check_same_base(data_state.get("base_checkpoint"), run.base_checkpoint)
    finite.check_tree({k: restored[k] for k in ("params", "model_state")},
                      f"The checkpoint of step {step}")

  found = ckpt.restore_latest(ckpt_lib.abstract_of(state_lib.checkpointed(state)), check,
                              iterator)
  if found is None:
    return state, 0
  restored, _, step = found
  writer_lib.console(f"Resuming from {ckpt.directory}/{step}")
  return dict(restored, frozen=state["frozen"]), int(step)


def _check_same_base(saved: Mapping[str, str] | None, current: Mapping[str, str] | None) -> None:
  saved_sha = (saved or {}).get("sha256")
  current_sha = (current or {}).get("sha256")
  if saved_sha != current_sha:
    raise ckpt_lib.IncompatibleCheckpoint(
        f"This workdir was trained from base checkpoint {saved} but the config now starts from "
        f"{current}: the adapted weights only fit their own base. Use a fresh --workdir.")


def _write_param_counts(workdir: epath.Path, state: Mapping[str, Any]) -> None:
  rows = param_paths.count_by_module(state["params"], state["frozen"])
  lines = ["| module | trainable | frozen |", "|---|---:|---:|"]
  lines += [f"| {m} | {t:,} | {f:,} |" for m, t, f in rows]
  table = "\n".join(lines)
  writer_lib.console("Parameters:\n" + table)
  if jax.process_index() == 0:
    files.write_text(workdir / "param_counts.md", table + "\n")
    files.write_json(workdir / "param_counts.json",
                     [dict(module=m, trainable=t, frozen=f) for m, t, f in rows])


def _train(config, run, update_fn, state, iterator, ckpt, writer, start: int,
           workdir: epath.Path, step_timer: costs_lib.StepTimer | None = None
           ) -> dict[str, Any]:
  """Trains steps `start + 1 .. total` (none for a finished run); returns the final state.

  `step_timer` is told when steps are done (`costs.StepTimer`; a fresh one when None)."""
  bar = tqdm.tqdm(total=run.total_steps, initial=start, unit="step", dynamic_ncols=True,
                  disable=not config.get("progress", True) or jax.process_index() != 0)
  with interrupt.StopOnSignal() as stop:
    try:
      return _train_steps(config, run, update_fn, state, iterator, ckpt, writer, start, bar,
                          stop, workdir, step_timer or costs_lib.StepTimer())
    finally:
      writer.flush()
      bar.close()


def _check_finite(step: int, measurements: Mapping[str, Any], ckpt: ckpt_lib.RunCheckpointer,
                  workdir: epath.Path) -> None:
  def last_checkpoint() -> epath.Path | None:
    ckpt.wait()
    last = ckpt.latest_step()
    return None if last is None else ckpt.directory / str(last)

  finite.check_measurements(step, measurements, workdir, last_checkpoint)


@dataclasses.dataclass(frozen=True)
class Cadence:
  """How often a run logs, evaluates and saves (in steps; 0 in the config: once per epoch)."""
  log_every: int
  eval_every: int
  ckpt_every: int

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, run: build.Run) -> "Cadence":
    return cls(config.get("log_every", 50) or 50,
               config.get("eval_every", 0) or run.steps_per_epoch,
               config.get("checkpoint_every", 0) or run.steps_per_epoch)

  def actions(self, step: int, total: int, stop: interrupt.StopOnSignal
              ) -> tuple[bool, bool, bool, bool]:
    """(stopping, log, evaluate, save) at `step` of `total`: the last step does all three."""
    last = step == total
    return (stop.requested(step) and not last, step % self.log_every == 0 or last,
            step % self.eval_every == 0 or last, step % self.ckpt_every == 0 or last)


def _train_steps(config, run, update_fn, state, iterator, ckpt, writer, start: int, bar,
                 stop: interrupt.StopOnSignal, workdir: epath.Path,
                 step_timer: costs_lib.StepTimer) -> dict[str, Any]:
  """Steps `start + 1 .. total`: log, evaluate, checkpoint; a stop request saves and raises.

  Every step's loss and parameter norm are checked, one step late to keep dispatch
  asynchronous, and at once at a step that is logged, evaluated or saved. Each check waits for
  its step, and tells `step_timer` it is done (no wait is added for timing).
  """
  total = run.total_steps
  cadence = Cadence.of(config, run)
  previous = None  # (step, measurements) of the step before.
  timer = (time.perf_counter(), start)
  for step in range(start + 1, total + 1):
    batch = mesh_lib.global_batch(next(iterator), run.mesh)
    state, measurements = update_fn(state, run.rng, batch)
    if previous is not None:
      _check_finite(*previous, ckpt, workdir)
      step_timer.done(previous[0])
    previous = (step, measurements)
    bar.update(1)
    stopping, log, evaluate, save = cadence.actions(step, total, stop)
    if stopping or log or evaluate or save:
      _check_finite(step, measurements, ckpt, workdir)
      step_timer.done(step)
    if log or stopping:  # The stopping step's metrics are written: a resume starts after it.
      timer = _log_train(step, measurements, timer, run, writer, bar)
    if evaluate:  # Also when stopping: a resume starts after this step and must not skip it.
      _evaluate_periodic(step, state, run, ckpt, writer, bar, workdir)
    if stopping:
      ckpt.save(step, state_lib.checkpointed(state), _data_state(run), iterator)
      ckpt.wait()
      raise interrupt.Stopped(step, stop.signum)
    if save:
      ckpt.save(step, state_lib.checkpointed(state), _data_state(run), iterator)
    if evaluate or save:
      step_timer.pause()  # The next step's interval holds the evaluation or the save.
  return state


def _log_train(step: int, measurements, timer: tuple[float, int], run, writer, bar
               ) -> tuple[float, int]:
  """Writes the training metrics of `step`; returns the new (time, step) of the rate timer."""
  now = time.perf_counter()
  rate = (step - timer[1]) * run.batch_size / max(now - timer[0], 1e-9)
  values = {f"train/{k}": float(v) for k, v in jax.device_get(measurements).items()}
  values.update({"train/epoch": run.epoch_of(step), "train/img_per_sec": rate})
  writer.write(step, values)
  bar.set_postfix(loss=f"{values['train/loss']:.4f}")
  return now, step


def _format(metrics: Mapping[str, float | None]) -> str:
  return ", ".join(f"{k}={'null' if v is None else f'{v:.4f}'}" for k, v in metrics.items()
                   if k.endswith(("/auc", "/acc")))


def _evaluate_periodic(step: int, state, run, ckpt: ckpt_lib.RunCheckpointer, writer, bar,
                       workdir: epath.Path | None = None) -> None:
  """Runs the periodic evaluators, logs them, and saves the weights if they are the best;
  evaluators that write files get `workdir` (none written without it)."""
  metrics = _evaluate(run.evaluators, state, run.periodic_evals, workdir=workdir, step=step)
  writer.write(step, metrics)
  if ckpt.best_metric and metrics:
    if ckpt.best_metric not in metrics:
      raise ValueError(f"config.best_metric={ckpt.best_metric!r} is not a metric of the "
                       f"evaluations; they give {sorted(metrics)}.")
    weights = {"params": state["params"], "model_state": state["model_state"]}
    ckpt.save_best(step, weights, metrics)
  bar.write(f"step {step}: " + _format(metrics))


def export_weights(path: epath.PathLike, state: Mapping[str, Any], adaptation: Any,
                   what: str = "The exported state") -> epath.Path:
  """Writes one plain checkpoint of the full model (LoRA merged) in fm_adapt's `.npz` layout.

  Raises:
    NonFiniteError: naming `what`, if any exported array is not finite (nothing is written).
  """
  variables = {"params": state_lib.full_params(state), **state["model_state"]}
  if jax.process_count() > 1:
    variables = multihost_utils.process_allgather(variables, tiled=True)
  variables = jax.device_get(variables)
  if adaptation is not None:
    variables["params"] = adaptation.merge(variables["params"])
  finite.check_tree(variables, what)
  path = files.as_path(path)
  if jax.process_index() == 0:
    native.save_native(path, variables)
  return path


def _final_results(config, run, ckpt, workdir, state) -> dict[str, Any]:
  """Evaluates the best checkpoint (by `best_metric`; else the final state) on every evaluator.

  The per-sample predictions of every evaluator go to `<workdir>/predictions/<name>.csv`.
  """
  best_step = ckpt.best_step()
  if best_step is not None:
    abstract = ckpt_lib.abstract_of({"params": state["params"], "model_state": state["model_state"]})
    state = dict(state, **ckpt.restore_best(abstract))
    selection = f"best_checkpoint ({ckpt.best_metric} at step {best_step})"
  else:
    reason = (f"no finite {ckpt.best_metric}" if ckpt.best_metric and run.periodic_evals else
              "no periodic evaluation" if ckpt.best_metric else "no config.best_metric")
    selection = f"final_state ({reason})"
    writer_lib.console(f"Warning: no best checkpoint ({reason}): the final state is evaluated "
                       "and exported.")
  metrics = _evaluate(run.evaluators, state, predictions_dir=workdir / "predictions",
                      workdir=workdir, step=run.total_steps if best_step is None else best_step)
  what = (f"The best checkpoint (step {best_step})" if best_step is not None else
          f"The final state (step {run.total_steps})")
  export = export_weights(workdir / "export" / "model.npz", state, run.adaptation, what)
  writer = writer_lib.MetricWriter(workdir, tensorboard=False)
  writer.write(run.total_steps, {f"best/{k}": v for k, v in metrics.items()})
  return {
      "best_step": best_step, "selection": selection, "total_steps": run.total_steps,
      "metrics": metrics, "data": dataclasses.asdict(run.spec),
      "model_name": config.model_name, "model": dict(config.get("model", {})),
      "seed": config.get("seed", 0), "base_checkpoint": run.base_checkpoint,
      "export": str(export), "label_fraction": run.label_fraction,
      "num_train_examples": run.num_train_examples, "train_class_counts": run.train_class_counts,
      "trainable_params": int(sum(np.size(x) for x in jax.tree.leaves(state["params"]))),
      "total_params": int(sum(np.size(x) for x in jax.tree.leaves(
          (state["params"], state["frozen"])))),
  }
