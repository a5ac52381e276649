"""CNN train-step time on XLA:CPU by convolution implementation (`fm_adapt.models.conv`).

  python -m benchmarks.conv_cpu                            # both models, median of 5 steps
  python -m benchmarks.conv_cpu --models resnet18 --steps 3 --out workdirs/bench/conv_cpu

For each model and conv_impl ('xla': plain lax convolutions; 'im2col_grad': the custom-gradient
convolutions) one jitted train step is timed on a fixed random batch: forward in train mode
(BatchNorm batch statistics, dropout), softmax cross-entropy, gradients of all parameters and an
SGD update. Reported: compile time, the median (min-max) wall time of --steps steps after one
warm-up step, the median process CPU time of a step (all threads; it grows much less than wall
time when other processes compete for the cores), images per second, and the relative
difference of the gradients from those of 'xla', ||g_impl - g_xla|| / ||g_xla|| over all
parameters (same parameters and batch). Per leaf it can be large where the true gradient is zero
(EfficientNet's project_bn biases feed a linear conv and a train-mode BatchNorm), so the norm is
taken over all parameters together. For scale: on EfficientNet-Lite0 at 96 px, batch 8, both
float32 implementations differ from a float64 step by 6e-3 to 8e-3 in this measure (train-mode
BatchNorm at random init amplifies rounding); 'im2col_grad' was the closer one.

Models: ResNet-18 with the CIFAR stem on 28 px single-channel images, batch 128 (MedMNIST), and
EfficientNet-Lite0 on 224 px RGB images, batch 16. Other processes on the machine change the
timings: the load average is printed with the table (see `uptime`).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common
from fm_adapt.models import efficientnet
from fm_adapt.models import resnet

NUM_CLASSES = 10
IMPLS = ('xla', 'im2col_grad')

# name -> (model of a conv_impl, image batch shape [B, H, W, C])
MODELS: dict[str, tuple[Callable[[str], nn.Module], tuple[int, int, int, int]]] = {
    'resnet18': (lambda impl: resnet.Model(NUM_CLASSES, depth=18, stem='cifar', conv_impl=impl),
                 (128, 28, 28, 1)),
    'efficientnet_lite0': (lambda impl: efficientnet.Model(NUM_CLASSES, conv_impl=impl),
                           (16, 224, 224, 3)),
}


def make_train_step(model: nn.Module, learning_rate: float = 0.01) -> Callable[..., Any]:
  """A jitted SGD train step: (params, batch_stats, images, labels, rng) -> new state, grads."""

  def loss_fn(params, batch_stats, images, labels, rng):
    (logits, _), updates = model.apply(
        {'params': params, 'batch_stats': batch_stats}, images, train=True,
        mutable=['batch_stats'], rngs={'dropout': rng})
    log_probs = jax.nn.log_softmax(logits)
    loss = -jnp.mean(jnp.take_along_axis(log_probs, labels[:, None], axis=-1))
    return loss, updates['batch_stats']

  def train_step(params, batch_stats, images, labels, rng):
    (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        params, batch_stats, images, labels, rng)
    params = jax.tree.map(lambda p, g: p - learning_rate * g, params, grads)
    return params, batch_stats, loss, grads

  return jax.jit(train_step)


def random_batch(shape: Sequence[int], seed: int = 0) -> tuple[jax.Array, jax.Array]:
  """Images ~ N(0, 1) and uniform labels, from numpy."""
  rng = np.random.default_rng(seed)
  images = rng.normal(size=shape).astype(np.float32)
  labels = rng.integers(0, NUM_CLASSES, size=shape[0]).astype(np.int32)
  return jnp.asarray(images), jnp.asarray(labels)


def time_impl(name: str, impl: str, variables: dict[str, Any], steps: int) -> dict[str, Any]:
  """Compiles and times the train step of one model and conv_impl."""
  make_model, shape = MODELS[name]
  images, labels = random_batch(shape)
  args = (variables['params'], variables['batch_stats'], images, labels, jax.random.key(1))
  start = time.perf_counter()
  compiled = make_train_step(make_model(impl)).lower(*args).compile()
  compile_s = time.perf_counter() - start
  grads = jax.block_until_ready(compiled(*args))[-1]  # Warm-up step.
  wall, cpu = common.time_calls(lambda: jax.block_until_ready(compiled(*args)), steps)
  return dict(model=name, impl=impl, batch=shape[0], compile_s=compile_s, times=wall,
              median=statistics.median(wall), min=min(wall), max=max(wall),
              cpu_median=statistics.median(cpu), grads=grads)


def relative_difference(tree: Any, reference: Any) -> float:
  """||tree - reference|| / ||reference||, the 2-norms over all leaves together."""
  squares = lambda t: sum(float(jnp.sum(jnp.square(leaf))) for leaf in jax.tree.leaves(t))
  diff = jax.tree.map(lambda a, b: a - b, tree, reference)
  return (squares(diff) / max(squares(reference), 1e-30)) ** 0.5


def run_model(name: str, steps: int) -> list[dict[str, Any]]:
  """Times every conv_impl of one model on the same parameters and batch."""
  make_model, shape = MODELS[name]
  images, _ = random_batch(shape)
  variables = jax.jit(make_model('xla').init)(jax.random.key(0), images)
  results = []
  for impl in IMPLS:
    results.append(time_impl(name, impl, variables, steps))
    print(f"{name} {impl}: compile {results[-1]['compile_s']:.1f} s, steps "
          f"{', '.join(f'{t:.3f}' for t in results[-1]['times'])} s", flush=True)
  grads = [result.pop('grads') for result in results]
  for result, result_grads in zip(results, grads):
    result['speedup'] = results[0]['median'] / result['median']
    result['grad_rel_diff'] = relative_difference(result_grads, grads[0])
  return results


def table(results: Sequence[dict[str, Any]]) -> str:
  """The markdown table of the results."""
  headers = ['model', 'batch', 'conv_impl', 'compile (s)', 'step (s), median [min-max]',
             'CPU s / step', 'img/s', 'speed-up', 'grad rel. diff']
  rows = [[r['model'], r['batch'], r['impl'], f"{r['compile_s']:.1f}",
           f"{r['median']:.3f} [{r['min']:.3f}-{r['max']:.3f}]", f"{r['cpu_median']:.2f}",
           f"{r['batch'] / r['median']:.1f}", f"{r['speedup']:.1f}x",
           f"{r['grad_rel_diff']:.1e}"] for r in results]
  lines = ['| ' + ' | '.join(headers) + ' |', '|' + '|'.join('---' for _ in headers) + '|']
  return '\n'.join(lines + ['| ' + ' | '.join(str(c) for c in row) + ' |' for row in rows])


def machine() -> dict[str, Any]:
  """CPU, cores, `uptime` (load averages) and versions."""
  cpu = platform.processor()
  for line in pathlib.Path('/proc/cpuinfo').read_text().splitlines():
    if line.startswith('model name'):
      cpu = line.split(':', 1)[1].strip()
      break
  uptime = subprocess.run(['uptime'], capture_output=True, text=True, check=False).stdout
  return dict(cpu=cpu, cores=os.cpu_count(), uptime=uptime.strip(), jax=jax.__version__,
              backend=jax.default_backend(), xla_flags=os.environ.get('XLA_FLAGS', ''))


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
  parser.add_argument('--models', nargs='+', default=list(MODELS), choices=list(MODELS))
  parser.add_argument('--steps', type=int, default=5, help='timed steps after one warm-up')
  parser.add_argument('--out', default=None, help='also write conv_cpu.md / .json here')
  args = parser.parse_args(argv)
  before = machine()
  results = [r for name in args.models for r in run_model(name, args.steps)]
  after = machine()
  markdown = '\n'.join([
      table(results), '',
      f"backend {before['backend']}, {before['cores']} cores, {before['cpu']}, jax {before['jax']}",
      f"uptime before: {before['uptime']}", f"uptime after:  {after['uptime']}"])
  print(markdown)
  if args.out:
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / 'conv_cpu.md').write_text(markdown + '\n')
    record = dict(results=results, machine_before=before, machine_after=after)
    (out / 'conv_cpu.json').write_text(json.dumps(record, indent=2, default=str) + '\n')


if __name__ == '__main__':
  main()
