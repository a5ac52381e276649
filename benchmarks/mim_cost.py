"""Cost of one MIM pretraining step: MAE (encoder on the visible patches) against SimMIM.

  python -m benchmarks.mim_cost --out workdirs/bench/mim_cost                 # Ti/4@28, S/16@224
  python -m benchmarks.mim_cost --quick --out workdirs/bench/mim_cost_quick   # < 1 min smoke run
  python -m benchmarks.mim_cost --models Ti/4@28 --batch 128 --steps 20 --ratio 0.75 --out DIR

Both steps are the library's own update step (`fm_adapt.train.step.make_update_fn` with the
objective of `fm_adapt.objectives.get_objective`, jitted with the state donated) on the MIM ViT
(`fm_adapt.models.mim.Model`) of the same encoder and a fixed random batch; both mask the same
ratio of patches. SimMIM: the encoder runs on every patch (mask tokens in place of the masked
ones), a linear decoder. MAE: the encoder runs on the visible patches only, then the default
transformer decoder (width 128, 2 blocks) on all patches. Measured per objective:
  FLOPs       XLA's `compiled.cost_analysis()['flops']` of the whole update step
  step time   median wall seconds of --steps steps, the two objectives timed round-robin in
              rounds of --per-round steps (order reversed every other round); the ratio is the
              median over rounds of the paired round means (robust to a changing load)
  img/s       batch / median step time (pretraining throughput on this machine)
Targets (issue 13): MAE at mask ratio 0.75 <= 0.45x SimMIM's FLOPs and <= 0.55x its time. A time
target is judged only on a quiet machine (CPU: load average < 2 on the development box) or on a
GPU. Writes mim_cost.md / mim_cost.json into --out.
"""
from __future__ import annotations

import argparse
import statistics
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from fm_adapt import objectives
from fm_adapt.models import mim
from fm_adapt.train import model_fns
from fm_adapt.train import step as step_lib

OBJECTIVES = {'simmim': 'linear', 'mae': 'transformer'}
QUICK = dict(models=['mu/4@28'], batch=8, steps=4, per_round=2)
QUIET_LOAD = 2.0
TARGETS = dict(flops=0.45, time=0.55)


def parse_model(spec: str) -> tuple[str, int]:
  """'S/16@224' -> ('S/16', 224)."""
  variant, sep, size = spec.partition('@')
  if not sep or not size.isdigit():
    raise ValueError(f"Model spec must look like 'S/16@224' (variant@pixels), got {spec!r}.")
  return variant, int(size)


def _flops(compiled: Any) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax: one dict per device.
    cost = cost[0] if cost else None
  return None if not cost else float(cost.get('flops', float('nan')))


def prepare(model_spec: str, name: str, batch: int, ratio: float) -> dict[str, Any]:
  """Builds and compiles one objective's update step; returns its record and step function."""
  variant, size = parse_model(model_spec)
  model = mim.Model(variant=variant, decoder_type=OBJECTIVES[name])
  shape = (size, size, 3)
  rng = np.random.default_rng(0)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, *shape),
                                                                               jnp.float32))
  params = jax.tree.map(lambda s: jnp.asarray(0.02 * rng.normal(size=s.shape), s.dtype),
                        abstract['params'])
  objective = objectives.get_objective(dict(name=name, mask=dict(name='random', ratio=ratio)),
                                       'multiclass', patch_size=model_fns.patch_size(model))
  tx = optax.adam(1e-4)
  update = step_lib.make_update_fn(model_fns.make_apply_fn(model), objective, tx,
                                   lambda s: 1e-4)
  state = {'params': params, 'frozen': {}, 'model_state': {}, 'opt': tx.init(params),
           'step': jnp.zeros((), jnp.int32)}
  data = {'image': jnp.asarray(rng.normal(size=(batch, *shape)), jnp.float32),
          'label': jnp.zeros(batch, jnp.int32), 'mask': jnp.ones(batch, bool)}
  key = jax.random.key(1)
  compiled = jax.jit(update, donate_argnums=(0,)).lower(state, key, data).compile()
  holder = dict(state=state)

  def step() -> None:
    holder['state'], holder['metrics'] = compiled(holder['state'], key, data)
    jax.block_until_ready(holder)

  step()  # Warm-up.
  return dict(record=dict(model=model_spec, objective=name, batch=batch, ratio=ratio,
                          flops=_flops(compiled), loss=float(holder['metrics']['loss'])),
              step=step)


def measure(model_spec: str, batch: int, ratio: float, steps: int, per_round: int
            ) -> list[dict[str, Any]]:
  """Both objectives of one model: FLOPs, then paired round-robin timing."""
  prepared = {}
  for name in OBJECTIVES:
    print(f'[mim_cost] {model_spec} batch {batch}: compiling {name} ...', flush=True)
    prepared[name] = prepare(model_spec, name, batch, ratio)
  load_start = common.load_average()
  rounds = max(-(-steps // per_round), 1)
  times = {n: dict(wall=[], cpu=[], rounds=[]) for n in prepared}
  for r in range(rounds):
    names = list(prepared) if r % 2 == 0 else list(prepared)[::-1]
    for name in names:
      wall, cpu = common.time_calls(prepared[name]['step'], min(per_round, steps - r * per_round))
      times[name]['wall'] += wall
      times[name]['cpu'] += cpu
      times[name]['rounds'].append(sum(wall) / len(wall))
  load = dict(start=load_start, end=common.load_average())
  records = []
  for name, p in prepared.items():
    t = times[name]
    step_time = common.summarize(t['wall'])
    records.append(dict(p['record'], step_time=step_time, cpu_time=common.summarize(t['cpu']),
                        round_times=t['rounds'], img_per_s=batch / step_time['median'],
                        load=load))
  return records


def ratios(records: Sequence[dict[str, Any]]) -> dict[str, float]:
  """MAE / SimMIM: FLOPs, paired step time, CPU time."""
  by = {r['objective']: r for r in records}
  mae, simmim = by['mae'], by['simmim']
  paired = statistics.median(a / b for a, b in zip(mae['round_times'], simmim['round_times']))
  return dict(flops=mae['flops'] / simmim['flops'], time=paired,
              cpu=mae['cpu_time']['median'] / simmim['cpu_time']['median'])


def _verdict(ok: bool, judged: bool) -> str:
  return ('MET' if ok else 'MISSED') if judged else 'not judged (machine under load)'


def report(args: argparse.Namespace, results: dict[str, list[dict[str, Any]]]) -> str:
  """Markdown table per model with the ratios and the verdicts."""
  info = common.machine_info()
  device = jax.devices()[0]
  lines = [f'## MIM pretraining step cost: MAE vs SimMIM (mask ratio {args.ratio})',
           f"Device: {device.platform} ({device.device_kind}); machine: {info['cpu']}, "
           f"{info['cores']} cores; jax {info['jax']}; float32; Adam; `uptime`: "
           f"{info['uptime']}. {args.steps} timed steps per objective in rounds of "
           f'{args.per_round}, after one warm-up step.']
  for model_spec, records in results.items():
    rows = [[r['objective'], r['batch'], f"{r['flops'] / 1e9:.2f}",
             f"{r['step_time']['median']:.4f}", f"{r['cpu_time']['median']:.3f}",
             f"{r['img_per_s']:.1f}", f"{r['loss']:.4f}"] for r in records]
    q = ratios(records)
    loads = [*records[0]['load']['start'][:1], *records[0]['load']['end'][:1]]
    judged = device.platform != 'cpu' or max(loads) < QUIET_LOAD
    lines += [f'### {model_spec}', common.markdown_table(
        ['objective', 'batch', 'GFLOPs/step', 'step s (median)', 'CPU s', 'img/s',
         'loss (1st step)'], rows),
              f"MAE / SimMIM: FLOPs {q['flops']:.3f}x "
              f"({_verdict(q['flops'] <= TARGETS['flops'], True)} <= {TARGETS['flops']}x), "
              f"step time {q['time']:.3f}x "
              f"({_verdict(q['time'] <= TARGETS['time'], judged)} <= {TARGETS['time']}x; load "
              f'{min(loads):.1f}-{max(loads):.1f}), CPU time {q["cpu"]:.3f}x.']
  markdown = '\n\n'.join(lines)
  if args.out:
    common.write_result(args.out, 'mim_cost', markdown,
                        dict(machine=info, device=str(device), args=vars(args),
                             results=results))
  return markdown


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Command-line flags."""
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--models', default='Ti/4@28,S/16@224',
                 help="comma-separated 'variant@pixels' (default: %(default)s)")
  p.add_argument('--batch', type=int, default=None,
                 help=f'batch for every model (default per model: {common.DEFAULT_BATCH})')
  p.add_argument('--ratio', type=float, default=0.75, help='mask ratio of both objectives')
  p.add_argument('--steps', type=int, default=12, help='timed steps per objective')
  p.add_argument('--per-round', type=int, default=3, help='steps per objective per round')
  p.add_argument('--out', default=None, help='run directory for mim_cost.{md,json}')
  p.add_argument('--quick', action='store_true', help=f'seconds-long smoke run: {QUICK}')
  args = p.parse_args(argv)
  args.models = args.models.split(',')
  if args.quick:
    args.models, args.steps, args.per_round = QUICK['models'], QUICK['steps'], QUICK['per_round']
    args.batch = args.batch or QUICK['batch']
  for model_spec in args.models:
    parse_model(model_spec)
  return args


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  results = {}
  for model_spec in args.models:
    batch = args.batch or common.DEFAULT_BATCH.get(model_spec, 32)
    results[model_spec] = measure(model_spec, batch, args.ratio, args.steps, args.per_round)
    print(report(args, results), flush=True)


if __name__ == '__main__':
  main()
