"""Train and evaluate one run config in a workdir: resumable, sharded, logged.

Resume order: the workdir's own checkpoint, then `config.model_init` (pretrained), then scratch.
"""
from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Mapping
from typing import Any

import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import tqdm

from fm_adapt import config as config_lib
from fm_adapt.adapt import masks
from fm_adapt.weights import native
from fm_adapt.evaluators import classification as cls_eval
from fm_adapt.train import checkpoint as ckpt_lib
from fm_adapt.train import interrupt
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import setup as setup_lib
from fm_adapt.train import writer as writer_lib


def _write_json(path: pathlib.Path, obj: Any) -> None:
  if jax.process_index() == 0:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str))
    tmp.replace(path)


def _saved(state: Mapping[str, Any]) -> dict[str, Any]:
  """What a checkpoint holds: everything but the frozen parameters.

  Frozen parameters are rebuilt by `init_state` from the seed and the base checkpoint (whose
  sha256 is stored beside), so an adapted run's checkpoint is not a second copy of its base.
  """
  return {k: v for k, v in state.items() if k != "frozen"}


def _data_state(iterator: Any, run: setup_lib.Run) -> dict[str, Any]:
  state = iterator.get_state()
  return {"iterator": state.decode() if isinstance(state, bytes) else json.dumps(state),
          "base_checkpoint": run.base_checkpoint}


def _set_iterator_state(iterator: Any, saved: Mapping[str, str]) -> None:
  iterator.set_state(saved["iterator"].encode())


def _check_finite(loss: float, step: int) -> None:
  if not math.isfinite(loss):
    raise FloatingPointError(
        f"Non-finite training loss ({loss}) at step {step}. Lower config.lr, add "
        "config.grad_clip_norm, or check the input pipeline for NaNs; the last good checkpoint "
        "is in <workdir>/ckpt.")


def _evaluate(evaluators: Mapping[str, cls_eval.Evaluator], state: Mapping[str, Any],
              names: list[str] | None = None) -> dict[str, float]:
  out = {}
  for name, evaluator in evaluators.items():
    if names is None or name in names:
      out.update({f"{name}/{k}": v for k, v in evaluator.run(state)})
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | pathlib.Path,
                       data_dir: str | None = None) -> dict[str, Any]:
  """Trains, evaluates and tests one run; returns (and writes) `results.json`.

  Args:
    config: the run config (see `fm_adapt.config.RUN_KEYS`).
    workdir: the run's directory; an existing checkpoint there is resumed.
    data_dir: data directory flag (else config.data_dir, FM_ADAPT_DATA_DIR, the cache dir).
  """
  config_lib.validate(config)
  workdir = pathlib.Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  _write_json(workdir / "config.json", config.to_dict())
  run = setup_lib.setup_run(config, data_dir or config.get("data_dir"))
  ckpt = ckpt_lib.RunCheckpointer(workdir, keep=config.get("keep_ckpts", 2),
                                  best_metric=config.get("best_metric", "val/auc"))
  state, data_state, start = _restore_or_init(run, ckpt)
  iterator = iter(run.train_loader)
  if data_state is not None:
    _set_iterator_state(iterator, data_state)
  _write_param_counts(workdir, state)
  update_fn = jit_update(run.update_fn, state, run.mesh)
  writer = writer_lib.MetricWriter(workdir)
  try:
    _train(config, run, update_fn, state, iterator, ckpt, writer, start)
    results = _final_results(config, run, ckpt, workdir)
  finally:
    ckpt.wait()
    ckpt.close()
    writer.close()
  _write_json(workdir / "results.json", results)
  return results


def _restore_or_init(run: setup_lib.Run, ckpt: ckpt_lib.RunCheckpointer):
  """Restores the workdir's latest checkpoint, else returns the freshly initialized state."""
  state = run.init_state()
  step = ckpt.latest_step()
  if step is None:
    return state, None, 0
  writer_lib.console(f"Resuming from {ckpt.directory}/{step}")
  restored, data_state = ckpt.restore(ckpt_lib.abstract_of(_saved(state)), step)
  _check_same_base(data_state.get("base_checkpoint"), run.base_checkpoint)
  return dict(restored, frozen=state["frozen"]), data_state, int(step)


def _check_same_base(saved: Mapping[str, str] | None, current: Mapping[str, str] | None) -> None:
  saved_sha = (saved or {}).get("sha256")
  current_sha = (current or {}).get("sha256")
  if saved_sha != current_sha:
    raise ValueError(
        f"This workdir was trained from base checkpoint {saved} but the config now starts from "
        f"{current}: the adapted weights only fit their own base. Use a fresh --workdir.")


def _write_param_counts(workdir: pathlib.Path, state: Mapping[str, Any]) -> None:
  rows = masks.count_by_module(state["params"], state["frozen"])
  lines = ["| module | trainable | frozen |", "|---|---:|---:|"]
  lines += [f"| {m} | {t:,} | {f:,} |" for m, t, f in rows]
  table = "\n".join(lines)
  writer_lib.console("Parameters:\n" + table)
  if jax.process_index() == 0:
    (workdir / "param_counts.md").write_text(table + "\n")
    _write_json(workdir / "param_counts.json",
                [dict(module=m, trainable=t, frozen=f) for m, t, f in rows])


def jit_update(update_fn, state: Mapping[str, Any], mesh: jax.sharding.Mesh):
  """Jits the update with the state's shardings, a sharded batch, and the state donated."""
  shardings = jax.tree.map(lambda x: x.sharding, state)
  replicated = mesh_lib.replicated(mesh)
  return jax.jit(update_fn, donate_argnums=(0,),
                 in_shardings=(shardings, replicated, mesh_lib.batch_sharding(mesh)),
                 out_shardings=(shardings, replicated))


def _train(config, run, update_fn, state, iterator, ckpt, writer, start: int) -> None:
  total = run.total_steps
  bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                  disable=not config.get("progress", True) or jax.process_index() != 0)
  with interrupt.StopOnSignal() as stop:
    try:
      state = _train_steps(config, run, update_fn, state, iterator, ckpt, writer, start, bar, stop)
    finally:
      writer.flush()
      bar.close()
  run.final_state = state


def _train_steps(config, run, update_fn, state, iterator, ckpt, writer, start: int, bar,
                 stop: interrupt.StopOnSignal):
  """Steps `start + 1 .. total`: log, evaluate, checkpoint; a stop request saves and raises."""
  total = run.total_steps
  log_every = config.get("log_every", 50) or 50
  eval_every = config.get("eval_every", 0) or run.steps_per_epoch
  ckpt_every = config.get("checkpoint_every", 0) or run.steps_per_epoch
  previous = None  # (step, loss array): checked one step late to keep dispatch asynchronous.
  timer = (time.perf_counter(), start)
  for step in range(start + 1, total + 1):
    batch = mesh_lib.global_batch(next(iterator), run.mesh)
    state, measurements = update_fn(state, run.rng, batch)
    if previous is not None:
      _check_finite(float(previous[1]), previous[0])
    previous = (step, measurements["loss"])
    bar.update(1)
    if stop.signum is not None and step < total:
      _check_finite(float(measurements["loss"]), step)
      ckpt.save(step, _saved(state), _data_state(iterator, run))
      ckpt.wait()
      raise interrupt.Stopped(step, stop.signum)
    if step % log_every == 0 or step == total:
      _check_finite(float(measurements["loss"]), step)
      now = time.perf_counter()
      rate = (step - timer[1]) * run.batch_size / max(now - timer[0], 1e-9)
      timer = (now, step)
      values = {f"train/{k}": float(v) for k, v in jax.device_get(measurements).items()}
      epoch = step * run.batch_size / run.num_train_examples
      values.update({"train/epoch": epoch, "train/img_per_sec": rate})
      writer.write(step, values)
      bar.set_postfix(loss=f"{values['train/loss']:.4f}")
    if step % eval_every == 0 or step == total:
      metrics = _evaluate(run.evaluators, state, run.periodic_evals)
      writer.write(step, metrics)
      weights = {"params": state["params"], "model_state": state["model_state"]}
      if ckpt.best_metric in metrics:
        ckpt.save_best(step, weights, metrics)
      bar.write(f"step {step}: " + ", ".join(
          f"{k}={v:.4f}" for k, v in metrics.items() if k.endswith(("/auc", "/acc"))))
    if step % ckpt_every == 0 or step == total:
      ckpt.save(step, _saved(state), _data_state(iterator, run))
  return state


def export_weights(path: pathlib.Path, state: Mapping[str, Any], adaptation: Any) -> pathlib.Path:
  """Writes one plain checkpoint of the full model (LoRA merged) in fm_adapt's `.npz` layout."""
  params = masks.merge(state["params"], state["frozen"])
  variables = {"params": params, **state["model_state"]}
  if jax.process_count() > 1:
    variables = multihost_utils.process_allgather(variables, tiled=True)
  variables = jax.device_get(variables)
  if adaptation is not None:
    variables["params"] = adaptation.merge(variables["params"])
  if jax.process_index() == 0:
    native.save_native(path, variables)
  return path


def _final_results(config, run, ckpt, workdir) -> dict[str, Any]:
  """Evaluates the best checkpoint (by `best_metric`) on every evaluator, test included."""
  state = getattr(run, "final_state", None)
  if state is None:  # The run had already finished: reload its last state.
    fresh = run.init_state()
    restored, _ = ckpt.restore(ckpt_lib.abstract_of(_saved(fresh)))
    state = dict(restored, frozen=fresh["frozen"])
  best_step = ckpt.best_step()
  if best_step is not None:
    abstract = ckpt_lib.abstract_of({"params": state["params"], "model_state": state["model_state"]})
    state = dict(state, **ckpt.restore_best(abstract))
  metrics = _evaluate(run.evaluators, state)
  export = export_weights(workdir / "export" / "model.npz", state, run.adaptation)
  writer = writer_lib.MetricWriter(workdir, tensorboard=False)
  writer.write(run.total_steps, {f"best/{k}": v for k, v in metrics.items()})
  return {
      "best_step": best_step, "total_steps": run.total_steps, "metrics": metrics,
      "data": dataclasses.asdict(run.spec),
      "model_name": config.model_name, "model": dict(config.get("model", {})),
      "seed": config.get("seed", 0), "base_checkpoint": run.base_checkpoint,
      "export": str(export),
      "trainable_params": int(sum(np.size(x) for x in jax.tree.leaves(state["params"]))),
      "total_params": int(sum(np.size(x) for x in jax.tree.leaves(
          (state["params"], state["frozen"])))),
  }
