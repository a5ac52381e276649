"""Cost of one training step for each adaptation strategy: time, FLOPs, state bytes, memory.

  python -m benchmarks.adapt_cost --out workdirs/bench/adapt_cost                # full run
  python -m benchmarks.adapt_cost --quick --out workdirs/bench/adapt_cost_quick  # < 1 min smoke run
  python -m benchmarks.adapt_cost --models Ti/4@28 --batch 64 --steps 20 --out DIR

Each strategy is built exactly as a training run builds it (`fm_adapt.train.model_fns.build_model`,
`compose.schedule_for` / `compose.SCHEDULE_PRESETS`, `optim.trainable_mask`,
`state.split_variables`, `optim.make_optimizer`, `step.make_update_fn`, `step.jit_update`), and
the library's own jitted update step is timed on a fixed random batch (data loading excluded).
All strategies of a model are compiled first, then timed round-robin in rounds of --per-round
steps (order reversed every other round), so a change in the load of a shared machine hits
every strategy alike; ratios to full fine-tuning are taken round by round.

Measured per strategy:
  step time      median of --steps steps (wall) after --warmup warm-up steps; CPU s/step too
  FLOPs          XLA's `compiled.cost_analysis()['flops']` of the whole update step
  state bytes    trainable params + optimizer state; and all params (frozen too) + opt state
  XLA memory     `compiled.memory_analysis()`: temp, argument and output bytes (the peak of
                 the step is about argument + temp + output - alias, alias = donated state)
  RSS delta      process peak RSS during the first execution minus RSS just before it
Writes adapt_cost.md / adapt_cost.json into --out and prints the table and notes.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import statistics
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from benchmarks import common
from fm_adapt.adapt import compose
from fm_adapt.train import build
from fm_adapt.train import step as step_lib
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import state as state_lib

NUM_CLASSES = 10
LORA_ALL = 'encoder/.*/(attn/(query|key|value|out)|mlp/(fc1|fc2))/kernel'


@dataclasses.dataclass(frozen=True)
class Strategy:
  """One adaptation strategy: transforms (`config.adapt`) and, without any, a schedule preset.

  Attributes:
    label: the name printed in the table.
    adapt: `config.adapt` transform dicts (see `compose.TRANSFORMS`).
    preset: a `compose.SCHEDULE_PRESETS` name used when `adapt` is empty.
  """
  label: str
  adapt: tuple[dict[str, Any], ...] = ()
  preset: str | None = None


STRATEGIES: dict[str, Strategy] = {
    'full': Strategy('full fine-tuning', preset='full'),
    'linear_probe': Strategy('linear probe', preset='linear_probe'),
    'bitfit': Strategy('BitFit', preset='bitfit'),
    'lora_qv': Strategy('LoRA r=8 (q,v)', adapt=(
        dict(name='lora', rank=8, alpha=16, targets='.*attn/(query|value)/kernel'),)),
    'lora_all': Strategy('LoRA r=8 (all linear)', adapt=(
        dict(name='lora', rank=8, alpha=16, targets=LORA_ALL),)),
    'vpt_deep': Strategy('VPT-deep 10 tokens', adapt=(
        dict(name='vpt', mode='deep', num_tokens=10),)),
    'adapter': Strategy('adapters (seq., dim 64)', adapt=(
        dict(name='adapter', mode='sequential', dim=64),)),
}

# Default batch per model. Memory would allow far larger batches (XLA temp ~15 MiB per image for
# ViT-Ti/4 @ 28 and ~130 MiB for S/16 @ 224 in a full step); these keep a full fine-tuning step at
# ~1 s (Ti) and ~3 s (S) on an idle 2-core AMD EPYC (Zen 3), so that the whole run fits in
# 15-25 minutes of a CPU shared with other jobs. Override with --batch.
DEFAULT_BATCH = common.DEFAULT_BATCH
QUICK = dict(models=['mu/4@28'], batch=8, steps=4, per_round=2, warmup=1)


def parse_model(spec: str) -> tuple[str, int]:
  """'S/16@224' -> ('S/16', 224)."""
  variant, sep, size = spec.partition('@')
  if not sep or not size.isdigit():
    raise ValueError(f"Model spec must look like 'S/16@224' (variant@pixels), got {spec!r}.")
  return variant, int(size)


def make_config(variant: str, strategy: Strategy) -> Any:
  """The run config of a strategy: plain Adam, lr 1e-3, no weight decay, no clipping."""
  config = ml_collections.ConfigDict()
  config.model_name = 'vit'
  config.model = dict(variant=variant)
  config.adapt = [dict(a) for a in strategy.adapt]
  config.schedule = None if strategy.adapt else compose.preset(strategy.preset)
  config.optax_name, config.optax, config.lr, config.wd = 'adam', {}, 1e-3, 0.0
  config.grad_clip_norm = None
  return config


def host_random_init(shapes: Any, mesh: Any) -> Any:
  """Random float32 variables of the given shapes made on the host (no init compilation).

  Values do not change a step's cost; this skips compiling the model's init, which takes
  longer than the smoke run's whole budget on a loaded 2-core CPU.
  """
  rng = np.random.default_rng(0)
  values = jax.tree.map(
      lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)
  return jax.device_put(values, mesh_lib.param_shardings(shapes, mesh))


def build_step(config: Any, image_shape: tuple[int, int, int], total_steps: int = 1000, *,
               host_init: bool = False) -> tuple[Any, dict[str, Any], Any]:
  """Builds the library's jitted update step and its initial state, as `build_run` does.

  Args:
    config: the run config (`make_config`).
    image_shape: (H, W, C) of one example.
    total_steps: total steps of the learning-rate schedules.
    host_init: fill the variables on the host (`host_random_init`) instead of running the
      model's jitted init (`state.sharded_init`, as a training run does).

  Returns:
    (jitted update_fn, train state, mesh).
  """
  # The model / optimizer / state part of `fm_adapt.train.build.build_run`, which also builds a
  # dataset, loader and evaluators that a benchmark does not need.
  mesh = mesh_lib.make_mesh(None)
  spec = types.SimpleNamespace(num_classes=NUM_CLASSES, task='multiclass')
  init_rng = jax.random.key(0)
  fns = build.build_train_fns(config, spec, image_shape, total_steps, init_rng)
  if host_init:
    variables = host_random_init(fns.variables_shape, mesh)
  else:
    variables = state_lib.sharded_init(fns.model_fns.init_fn, init_rng, mesh)
  state = state_lib.initial_state(fns, variables, mesh)
  return step_lib.jit_update(fns.update_fn, state, mesh), state, mesh


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of a tree."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, 'dtype'))


def tree_count(tree: Any) -> int:
  """Total number of elements of the array leaves of a tree."""
  return sum(int(x.size) for x in jax.tree.leaves(tree) if hasattr(x, 'size'))


def random_batch(mesh: Any, batch: int, image_size: int) -> dict[str, Any]:
  """A fixed random batch (images, integer labels, all-True mask) on the mesh."""
  rng = np.random.default_rng(0)
  local = dict(image=rng.standard_normal((batch, image_size, image_size, 3), np.float32),
               label=rng.integers(0, NUM_CLASSES, (batch,), np.int32),
               mask=np.ones((batch,), bool))
  return mesh_lib.global_batch(local, mesh)


def _memory_stats(compiled: Any) -> dict[str, int | None]:
  stats = compiled.memory_analysis()
  get = lambda name: None if stats is None else int(getattr(stats, name, 0))
  return dict(temp=get('temp_size_in_bytes'), argument=get('argument_size_in_bytes'),
              output=get('output_size_in_bytes'), alias=get('alias_size_in_bytes'),
              generated_code=get('generated_code_size_in_bytes'))


def _flops(compiled: Any) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older jax returned one dict per device.
    cost = cost[0] if cost else None
  return None if not cost else float(cost.get('flops', float('nan')))


@dataclasses.dataclass
class Prepared:
  """A compiled strategy ready to be timed: its record so far and a one-step function."""
  record: dict[str, Any]
  step: Callable[[], None]


def prepare(model: str, strategy_name: str, batch: int, warmup: int, *,
            host_init: bool = True) -> Prepared:
  """Builds and compiles one strategy's update step, measures its sizes, FLOPs and memory.

  The first execution is made here, between a peak-RSS reset and a peak-RSS read, after
  releasing the allocator's cached free memory, so its RSS delta is what that step allocates.
  """
  variant, size = parse_model(model)
  strategy = STRATEGIES[strategy_name]
  jitted, state, mesh = build_step(make_config(variant, strategy), (size, size, 3),
                                   host_init=host_init)
  data, rng = random_batch(mesh, batch, size), jax.random.key(1)
  record = dict(model=model, strategy=strategy_name, label=strategy.label, batch=batch,
                host_init=host_init, trainable_params=tree_count(state['params']),
                total_params=tree_count(state['params']) + tree_count(state['frozen']),
                trainable_bytes=tree_bytes(state['params']),
                frozen_bytes=tree_bytes(state['frozen']), opt_bytes=tree_bytes(state['opt']))
  compiled = jitted.lower(state, rng, data).compile()
  record.update(flops=_flops(compiled), xla_memory=_memory_stats(compiled))
  jax.block_until_ready(state)
  common.trim_malloc()
  rss_before, reset = common.rss_bytes(), common.reset_peak_rss()
  holder = dict(state=state)

  def step() -> None:
    """One update step, waited for."""
    holder['state'], holder['metrics'] = compiled(holder['state'], rng, data)
    jax.block_until_ready(holder)

  step()
  peak = common.peak_rss_bytes()
  record['rss'] = dict(before=rss_before, peak_first_step=peak, reset_worked=reset,
                       delta=peak - rss_before if reset and peak and rss_before else None)
  for _ in range(max(warmup - 1, 0)):
    step()
  record['loss'] = float(holder['metrics']['loss'])
  return Prepared(record, step)


def time_round_robin(prepared: Mapping[str, Prepared], steps: int, per_round: int) -> None:
  """Times every strategy in rounds of `per_round` steps, strategies in turn, into its record.

  The order is reversed every other round. Adds to each record: `times` / `cpu_times` (all
  steps), `step_time` / `cpu_time` summaries, and `round_times` (mean step time per round),
  from which ratios to another strategy are taken round by round (paired under the same load).
  """
  names = list(prepared)
  rounds = max(math.ceil(steps / per_round), 1)
  timings = {n: dict(wall=[], cpu=[], rounds=[]) for n in names}
  for r in range(rounds):
    n_steps = min(per_round, steps - r * per_round)
    for name in (names if r % 2 == 0 else names[::-1]):
      wall, cpu = common.time_calls(prepared[name].step, n_steps)
      timings[name]['wall'] += wall
      timings[name]['cpu'] += cpu
      timings[name]['rounds'].append(sum(wall) / len(wall))
    print(f'  round {r + 1}/{rounds}: ' + ', '.join(
        f"{n} {timings[n]['rounds'][-1]:.2f} s" for n in names), flush=True)
  for name, t in timings.items():
    prepared[name].record.update(
        times=t['wall'], cpu_times=t['cpu'], round_times=t['rounds'],
        step_time=common.summarize(t['wall']), cpu_time=common.summarize(t['cpu']))


def measure_model(model: str, strategies: Sequence[str], batch: int, steps: int, warmup: int,
                  per_round: int, host_init: bool) -> list[dict[str, Any]]:
  """Prepares every strategy of one model, then times them round-robin; returns the records."""
  prepared = {}
  for name in strategies:
    print(f'[adapt_cost] {model} batch {batch}: compiling {name} ...', flush=True)
    prepared[name] = prepare(model, name, batch, warmup, host_init=host_init)
  load_start = common.load_average()
  print(f'[adapt_cost] {model}: timing {steps} steps each, {per_round} per round ...', flush=True)
  time_round_robin(prepared, steps, per_round)
  load = dict(start=load_start, end=common.load_average())
  for p in prepared.values():
    p.record['loadavg_timing'] = load
  return [p.record for p in prepared.values()]


def paired_ratio(record: Mapping[str, Any], base: Mapping[str, Any]) -> float:
  """Median over rounds of (record's mean step time / base's mean step time in that round)."""
  return statistics.median(a / b for a, b in zip(record['round_times'], base['round_times']))


def _ratio(value: float | None, base: float | None) -> str:
  if value is None or not base:
    return 'n/a'
  return f'{value / base:.2f}x'


def _gflops(flops: float | None) -> str:
  return 'n/a' if flops is None or math.isnan(flops) else f'{flops / 1e9:.3g}'


def _state_bytes(record: Mapping[str, Any], *, frozen: bool) -> int:
  """Trainable params + optimizer state bytes (+ frozen params when `frozen`)."""
  return (record['trainable_bytes'] + record['opt_bytes']
          + (record['frozen_bytes'] if frozen else 0))


def _xla_peak(mem: Mapping[str, int | None]) -> int | None:
  """argument + output - alias (donated) + temp: XLA's estimate of the step's live bytes."""
  if mem['temp'] is None:
    return None
  return mem['argument'] + mem['output'] - mem['alias'] + mem['temp']


TABLE_HEADERS = ('strategy', 'trainable params', 'step s (median)', 'vs full', 'CPU s/step',
                 'vs full', 'GFLOP/step', 'vs full', 'trainable + opt', 'vs full',
                 'all params + opt', 'vs full', 'XLA temp', 'XLA peak', 'RSS delta')


def table(records: Sequence[dict[str, Any]]) -> str:
  """The markdown table of one model's records, with ratios to full fine-tuning."""
  base = next((r for r in records if r['strategy'] == 'full'), None)
  rows = []
  for r in records:
    of_base = lambda fn: None if base is None else fn(base)
    cpu = lambda x: x['cpu_time']['median']
    small = lambda x: _state_bytes(x, frozen=False)
    resident = lambda x: _state_bytes(x, frozen=True)
    rows.append([
        r['label'], f"{r['trainable_params']:,} ({r['trainable_params'] / r['total_params']:.2%})",
        f"{r['step_time']['median']:.3f}",
        'n/a' if base is None else f'{paired_ratio(r, base):.2f}x',
        f'{cpu(r):.3f}', _ratio(cpu(r), of_base(cpu)),
        _gflops(r['flops']), _ratio(r['flops'], of_base(lambda x: x['flops'])),
        common.human_bytes(small(r)), _ratio(small(r), of_base(small)),
        common.human_bytes(resident(r)), _ratio(resident(r), of_base(resident)),
        common.human_bytes(r['xla_memory']['temp']), common.human_bytes(_xla_peak(r['xla_memory'])),
        common.human_bytes(r['rss']['delta'])])
  return common.markdown_table(TABLE_HEADERS, rows)


# A speed verdict needs a quiet machine: the 1-minute load average, before and after the
# measurement, below this (the two cores of the development machine).
QUIET_LOAD = 2.0


def _speed_verdict(ok: bool, loads: Sequence[float]) -> str:
  if max(loads) >= QUIET_LOAD:
    return (f'not judged: measured under load (load average {min(loads):.1f}-{max(loads):.1f}, '
            f'quiet < {QUIET_LOAD:g})')
  return 'MET' if ok else 'MISSED'


def target_notes(records: Sequence[dict[str, Any]], loads: Sequence[float] = (0.0,)) -> list[str]:
  """Checks the targets: LoRA step <= 0.7x full; LoRA params + optimizer bytes <= 0.5x full.

  Step-time targets are judged only when every load average in `loads` (before and after the
  measurement) shows a quiet machine; byte targets do not depend on the load.
  """
  by = {r['strategy']: r for r in records}
  if 'full' not in by:
    return []
  full, notes = by['full'], []
  for name in ('lora_qv', 'lora_all'):
    if name not in by:
      continue
    r = by[name]
    wall = paired_ratio(r, full)
    cpu = r['cpu_time']['median'] / full['cpu_time']['median']
    flops = r['flops'] / full['flops'] if r['flops'] and full['flops'] else float('nan')
    small = _state_bytes(r, frozen=False) / _state_bytes(full, frozen=False)
    resident = _state_bytes(r, frozen=True) / _state_bytes(full, frozen=True)
    verdict = lambda ok: 'MET' if ok else 'MISSED'
    notes.append(
        f"{r['label']}: step time {wall:.2f}x full ({_speed_verdict(wall <= 0.7, loads)} "
        f'<= 0.7x; CPU time {cpu:.2f}x, FLOPs {flops:.2f}x); trainable params + optimizer '
        f'state {small:.3f}x '
        f'({verdict(small <= 0.5)} <= 0.5x); with the frozen params too {resident:.2f}x.')
  return notes


EXPLANATION = """\
The mechanisms behind the ratios above; the measured figures, their machine and load, and the
analysis of each run are in benchmarks/README.md (this text states no figures of its own).
- Step-time ratios are paired: strategies are timed in alternating round-robin rounds and each
  ratio is the median over rounds of the two strategies' mean step times in that round, so
  changes in the load of the shared CPU hit both. CPU s/step (all threads of the process) is
  less sensitive to the load than wall time. Speed targets are judged only on a quiet machine.
- A full step is forward F + activation-gradient backward (~F) + weight-gradient backward (~F
  for the kernels). LoRA skips only the weight gradients of the frozen kernels (the library
  passes them as non-differentiated inputs, so XLA never forms dL/dW), but still back-propagates
  activation gradients through every block down to the first adapted layer, so its FLOP floor is
  about 2/3 of full, like BitFit's. LoRA's rank-r dots (per adapted layer 2 forward + 4 backward)
  are memory- and call-overhead-bound, so its time sits above its FLOPs on small models. Going
  well below ~2/3 needs less backward (e.g. LoRA on the last k blocks only), not a cheaper LoRA.
- The LoRA branch runs on 2-D [tokens, width] views (adapt/lora.py), so its factor gradients
  contract over one axis in place instead of XLA:CPU materialising transposed activations.
- The full step's Adam update is memory-bound and a few percent of a step at these sizes.
- Linear probing needs no backward through the encoder (~1/3 of the FLOPs). VPT-deep's extra
  tokens make every block longer, relatively more on models with few tokens.
- Memory: the step's live memory (XLA temp) is dominated by the saved activations, which every
  strategy that back-propagates into the first block keeps; LoRA saves the parameter-sized
  buffers (no gradient and no Adam moments for the frozen weights), not the activations."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Command-line flags."""
  p = common.model_parser(__doc__, STRATEGIES)
  p.add_argument('--steps', type=int, default=20, help='timed steps per strategy (median)')
  p.add_argument('--per-round', type=int, default=4, help='steps per strategy per round')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps after compilation')
  p.add_argument('--init', choices=('host', 'library'), default='host',
                 help="'host': random values made with numpy (default; skips compiling the "
                      "model's init, which does not change the step); 'library': the model's "
                      'jitted init (state.sharded_init), as a training run does')
  p.add_argument('--out', default=None, help='run directory for adapt_cost.{md,json}')
  p.add_argument('--quick', action='store_true', help=f'seconds-long smoke run: {QUICK}')
  args = p.parse_args(argv)
  args.models, args.strategies = args.models.split(','), args.strategies.split(',')
  if args.quick:
    args.models, args.steps, args.warmup = QUICK['models'], QUICK['steps'], QUICK['warmup']
    args.per_round, args.batch = QUICK['per_round'], args.batch or QUICK['batch']
  common.check_model_args(p, args, STRATEGIES, parse_model)
  return args


def report(args: argparse.Namespace, sections: Sequence[str], records: Sequence[dict[str, Any]],
           load_before: tuple[float, float, float]) -> str:
  """The markdown report; also written (with a JSON record) to --out when given."""
  info = dict(common.machine_info(), loadavg_before=load_before)
  header = (f"Machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']}; float32; plain "
            f"Adam; XLA_FLAGS={info['xla_flags'] or '(none)'}. Load average before "
            f"{load_before[0]:.2f}, after {info['loadavg'][0]:.2f} (`uptime`: {info['uptime']}). "
            f'{args.steps} timed steps per strategy in rounds of {args.per_round} after '
            f'{args.warmup} warm-up; XLA peak = argument + output - donated alias + temp bytes; '
            'RSS delta = peak RSS during the first step minus RSS before it.')
  markdown = '\n\n'.join(['## Adaptation cost per training step', header, *sections,
                           '### Notes\n\n' + EXPLANATION])
  if args.out:
    common.write_result(args.out, 'adapt_cost', markdown,
                        dict(machine=info, args=vars(args), records=list(records)))
  return markdown


def main(argv: Sequence[str] | None = None) -> None:
  """Measures every (model, strategy), prints the tables and notes, writes the result files.

  The files are rewritten after each model, so an interrupted run keeps what it measured.
  """
  args = parse_args(argv)
  load_before, sections, records = common.load_average(), [], []
  for model in args.models:
    batch = args.batch_for[model]
    rows = measure_model(model, args.strategies, batch, args.steps, args.warmup,
                         args.per_round, host_init=args.init == 'host')
    records += rows
    loads = (load_before[0], common.load_average()[0])
    notes = '\n'.join(f'- {n}' for n in target_notes(rows, loads))
    sections.append(f'### ViT-{model} px, batch {batch}\n\n{table(rows)}\n\n{notes}'.rstrip())
    markdown = report(args, sections, records, load_before)
  print(markdown)
  if args.out:
    print(f'[adapt_cost] wrote {args.out}/adapt_cost.md and .json')


if __name__ == '__main__':
  main()
