"""Per-device memory of full fine-tuning sharded over an 'fsdp' mesh axis, against one device.

  python -m benchmarks.memory_scaling --out workdirs/bench/memory       # ViT-L/16 @ 224, fsdp=8
  python -m benchmarks.memory_scaling --model mu/4@16 --fsdp 4 --out DIR  # seconds

Runs on N simulated CPU devices: the benchmark asks JAX for them (`jax_num_cpu_devices`) before
anything touches a device; in a process that has already started JAX, start it with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` instead.

Nothing is materialised, so ViT-L fits on a laptop: the variable shapes come from
`jax.eval_shape` of the library's init, the shardings from the library (`mesh.param_shardings`
with the default rule ('.*', 'fsdp'), `mesh.optimizer_shardings`), and the library's own update
step (`build.build_train_fns`, `step.jit_update`; AdamW, full fine-tuning) is lowered and
compiled with `jax.ShapeDtypeStruct`s that carry those shardings. Two meshes are compared:
one device (data 1 x fsdp 1) and N devices (data 1 x fsdp N), at the same batch per device.

Measured per mesh, per device:
  params, opt state  bytes of one device's shard of every leaf (`sharding.shard_shape`)
  XLA argument       `compiled.memory_analysis()` argument bytes (state + batch shard + key)
  XLA temp / peak    the step's scratch, and argument + output - donated alias + temp
The target: parameters + optimizer state per device with fsdp=N at most 1/6 of one device's.
Writes memory_scaling.md / memory_scaling.json into --out and prints the table.
"""
from __future__ import annotations

import argparse
import math
import time
import types
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from benchmarks import common
from fm_adapt.train import build
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import state as state_lib
from fm_adapt.train import step as step_lib

NUM_CLASSES = 1000
TARGET_RATIO = 1 / 6  # Per-device params + optimizer state with fsdp >= 8, vs one device.
TARGET_FSDP = 8


def parse_model(spec: str) -> tuple[str, int]:
  """'L/16@224' -> ('L/16', 224)."""
  variant, sep, size = spec.partition('@')
  if not sep or not size.isdigit():
    raise ValueError(f"--model must look like 'L/16@224' (variant@pixels), got {spec!r}.")
  return variant, int(size)


def make_config(variant: str, dtype: str, remat: bool) -> ml_collections.ConfigDict:
  """Full fine-tuning of a ViT with AdamW (lr 1e-4, weight decay 0.05), every leaf 'fsdp'."""
  config = ml_collections.ConfigDict()
  config.model_name, config.model = 'vit', dict(variant=variant)
  config.adapt, config.schedule = [], dict(decay_type='cosine', warmup_steps=10)
  config.optax_name, config.optax, config.lr, config.wd = 'adamw', {}, 1e-4, 0.05
  config.grad_clip_norm, config.dtype, config.remat = 1.0, dtype, remat
  return config


def make_mesh(devices: Sequence[Any]) -> jax.sharding.Mesh:
  """A data 1 x fsdp len(devices) mesh over the given devices."""
  return jax.make_mesh((1, len(devices)), mesh_lib.MESH_AXES, devices=list(devices),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def _with_sharding(shapes: Any, shardings: Any) -> Any:
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, shardings)


def abstract_state(fns: build.TrainFns, mesh: jax.sharding.Mesh) -> dict[str, Any]:
  """The train state of `state.initial_state` as sharded ShapeDtypeStructs (no arrays)."""
  variables = _with_sharding(fns.variables_shape,
                             mesh_lib.param_shardings(fns.variables_shape, mesh))
  params, frozen, model_state = state_lib.split_variables(variables, fns.trainable)
  opt_shapes = jax.eval_shape(fns.tx.init, params)
  opt_shardings = mesh_lib.optimizer_shardings(
      fns.tx, opt_shapes, jax.tree.map(lambda x: x.sharding, params), mesh)
  step = jax.ShapeDtypeStruct((), jnp.int32, sharding=mesh_lib.replicated(mesh))
  return {'params': params, 'frozen': frozen, 'model_state': model_state,
          'opt': _with_sharding(opt_shapes, opt_shardings), 'step': step}


def per_device_bytes(tree: Any) -> int:
  """Bytes of one device's shard of every leaf (leaves carry their sharding)."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def total_bytes(tree: Any) -> int:
  """Bytes of the whole (unsharded) leaves."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def abstract_batch(mesh: jax.sharding.Mesh, batch: int, size: int) -> dict[str, Any]:
  """Images, labels and mask of a global batch, sharded as a training batch is."""
  sharding = mesh_lib.batch_sharding(mesh)
  return {'image': jax.ShapeDtypeStruct((batch, size, size, 3), jnp.float32, sharding=sharding),
          'label': jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=sharding),
          'mask': jax.ShapeDtypeStruct((batch,), jnp.bool_, sharding=sharding)}


def _memory(compiled: Any) -> dict[str, int | None]:
  stats = compiled.memory_analysis()
  get = lambda name: None if stats is None else int(getattr(stats, name, 0))
  mem = dict(argument=get('argument_size_in_bytes'), output=get('output_size_in_bytes'),
             alias=get('alias_size_in_bytes'), temp=get('temp_size_in_bytes'))
  mem['peak'] = (None if mem['temp'] is None
                 else mem['argument'] + mem['output'] - mem['alias'] + mem['temp'])
  return mem


def measure(config: ml_collections.ConfigDict, size: int, devices: Sequence[Any],
            batch_per_device: int) -> dict[str, Any]:
  """Per-device state bytes and XLA memory of the compiled update on a data 1 x fsdp N mesh."""
  mesh = make_mesh(devices)
  spec = types.SimpleNamespace(num_classes=NUM_CLASSES, task='multiclass')
  fns = build.build_train_fns(config, spec, (size, size, 3), 1000, jax.random.key(0))
  state = abstract_state(fns, mesh)
  batch = abstract_batch(mesh, batch_per_device * len(devices), size)
  rng = jax.ShapeDtypeStruct((), jax.random.key(0).dtype, sharding=mesh_lib.replicated(mesh))
  start = time.perf_counter()
  compiled = step_lib.jit_update(fns.update_fn, state, mesh).lower(state, rng, batch).compile()
  return dict(devices=len(devices), mesh=dict(mesh.shape), batch=batch_per_device * len(devices),
              params=per_device_bytes(state['params']), opt=per_device_bytes(state['opt']),
              params_total=total_bytes(state['params']), opt_total=total_bytes(state['opt']),
              num_params=sum(math.prod(x.shape) for x in jax.tree.leaves(state['params'])),
              xla=_memory(compiled), compile_s=time.perf_counter() - start)


def state_bytes(record: dict[str, Any]) -> int:
  """Parameters + optimizer state per device."""
  return record['params'] + record['opt']


TABLE_HEADERS = ('mesh', 'global batch', 'params / device', 'opt state / device',
                 'params + opt / device', 'vs 1 device', 'XLA argument', 'XLA temp',
                 'XLA peak', 'compile s')


def table(records: Sequence[dict[str, Any]]) -> str:
  """The markdown table, ratios against the first (one-device) record."""
  base, hb = state_bytes(records[0]), common.human_bytes
  rows = [[' x '.join(f'{k} {v}' for k, v in r['mesh'].items()), r['batch'], hb(r['params']),
           hb(r['opt']), hb(state_bytes(r)), f'{state_bytes(r) / base:.3f}',
           hb(r['xla']['argument']), hb(r['xla']['temp']), hb(r['xla']['peak']),
           f"{r['compile_s']:.0f}"] for r in records]
  return common.markdown_table(TABLE_HEADERS, rows)


def verdict(records: Sequence[dict[str, Any]]) -> str:
  """The target line: params + optimizer state per device with fsdp=N vs one device."""
  n = records[-1]['devices']
  ratio = state_bytes(records[-1]) / state_bytes(records[0])
  judged = (('MET' if ratio <= TARGET_RATIO else 'MISSED') if n >= TARGET_FSDP
            else f'not judged: the target is for fsdp >= {TARGET_FSDP}')
  return (f'params + optimizer state per device with fsdp={n}: {ratio:.3f}x of one device '
          f'(target <= 1/6 = {TARGET_RATIO:.3f}: {judged}; an even split is 1/{n} = '
          f'{1 / n:.3f}).')


def request_cpu_devices(n: int) -> list[Any]:
  """N CPU devices: asks JAX for them if it has not started yet; fails naming the fix."""
  try:
    jax.config.update('jax_num_cpu_devices', n)
  except RuntimeError:  # JAX has started: the count is fixed (e.g. by XLA_FLAGS).
    pass
  devices = jax.devices('cpu')
  if len(devices) < n:
    raise SystemExit(f'memory_scaling needs {n} CPU devices, JAX has {len(devices)}: run it as '
                     f'XLA_FLAGS=--xla_force_host_platform_device_count={n} python -m '
                     'benchmarks.memory_scaling ...')
  return devices[:n]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Command-line flags."""
  p = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--model', default='L/16@224', help="'variant@pixels' (default: %(default)s)")
  p.add_argument('--fsdp', type=int, default=8, help='devices of the sharded mesh (default 8)')
  p.add_argument('--batch-per-device', type=int, default=1, help='images per device (default 1)')
  p.add_argument('--dtype', default='float32', help="config.dtype: 'float32' or 'bfloat16'")
  p.add_argument('--remat', action='store_true', help='config.remat=True')
  p.add_argument('--out', default=None, help='run directory for memory_scaling.{md,json}')
  args = p.parse_args(argv)
  try:
    parse_model(args.model)
  except ValueError as e:
    p.error(str(e))
  if args.fsdp < 2:
    p.error(f'--fsdp must be at least 2, got {args.fsdp}')
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  """Compiles the update on 1 and on --fsdp devices, prints the table, writes the files."""
  args = parse_args(argv)
  devices = request_cpu_devices(args.fsdp)
  variant, size = parse_model(args.model)
  config = make_config(variant, args.dtype, args.remat)
  records = []
  for group in (devices[:1], devices):
    print(f'[memory_scaling] ViT-{args.model}: compiling the update on {len(group)} '
          'device(s) ...', flush=True)
    records.append(measure(config, size, group, args.batch_per_device))
  info = common.machine_info()
  header = (f"ViT-{args.model} full fine-tuning, AdamW, {records[0]['num_params']:,} parameters "
            f"({common.human_bytes(records[0]['params_total'])}; optimizer state "
            f"{common.human_bytes(records[0]['opt_total'])}), compute dtype {args.dtype}"
            f"{', remat' if args.remat else ''}, {args.batch_per_device} image(s) per device; "
            f"{len(devices)} simulated CPU devices, jax {info['jax']}. Shapes and shardings only "
            '(jax.eval_shape; the update lowered and compiled on ShapeDtypeStructs).')
  markdown = '\n\n'.join(['## Per-device memory with FSDP', header, table(records),
                          '- ' + verdict(records)])
  record = dict(machine=info, args=vars(args), records=records,
                ratio=state_bytes(records[-1]) / state_bytes(records[0]))
  print(markdown)
  if args.out:
    common.write_result(args.out, 'memory_scaling', markdown, record)
    print(f'[memory_scaling] wrote {args.out}/memory_scaling.md and .json')
  return record


if __name__ == '__main__':
  main()
