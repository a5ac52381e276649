"""Device mesh, parameter sharding by regex, global batches.

`config.mesh = [('data', -1), ('fsdp', 1)]`: axis names and sizes, -1 takes the remaining
devices. The batch is sharded over all mesh axes; parameters are replicated or sharded over
'fsdp' along their largest divisible dimension, by `config.sharding_rules` (big_vision idea):
(regex, strategy) rules over parameter paths ('encoder/block_0/mlp/fc1/kernel'), matched as
schedule rules are (full match, first rule wins, every parameter matched, every rule used).
Optimizer moments take their parameter's sharding (`optimizer_shardings`).
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fm_adapt import param_paths
from fm_adapt.train import processes

MESH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
  """Joins the multi-process job the environment describes (`processes.start`); once per process."""
  processes.start()


def make_mesh(axes: Sequence[tuple[str, int]] | None = None) -> Mesh:
  """Builds a mesh over all devices from [(name, size), ...]; one size may be -1."""
  axes = list(axes or [("data", -1), ("fsdp", 1)])
  names = [a for a, _ in axes]
  unknown = sorted(set(names) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"Unknown mesh axes {unknown}; valid: {list(MESH_AXES)}")
  sizes = [int(s) for _, s in axes]
  count = jax.device_count()
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1, got {axes}")
  known = int(np.prod([s for s in sizes if s != -1]))
  if count % known:
    raise ValueError(f"Mesh {axes} does not divide the {count} devices.")
  sizes = [count // known if s == -1 else s for s in sizes]
  if int(np.prod(sizes)) != count:
    raise ValueError(f"Mesh {dict(zip(names, sizes))} needs {np.prod(sizes)} devices; have {count}.")
  # Auto axes: shardings propagate through jit (GSPMD); parameters and batches are placed
  # explicitly by `param_shardings` / `batch_sharding`.
  return jax.make_mesh(tuple(sizes), tuple(names), devices=jax.devices(),
                       axis_types=(jax.sharding.AxisType.Auto,) * len(names))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Shards the leading (batch) dimension over every mesh axis."""
  return NamedSharding(mesh, P(mesh.axis_names))


def _fsdp_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
  size = mesh.shape.get("fsdp", 1)
  if size == 1:
    return P()
  for dim in np.argsort(shape)[::-1]:
    if shape[dim] % size == 0 and shape[dim] >= size:
      spec = [None] * len(shape)
      spec[dim] = "fsdp"
      return P(*spec)
  return P()


SHARDING_STRATEGIES = ("fsdp", "replicate")
DEFAULT_SHARDING_RULES = ((".*", "fsdp"),)


def _strategy_spec(strategy: str, shape: tuple[int, ...], mesh: Mesh) -> P:
  return _fsdp_spec(shape, mesh) if strategy == "fsdp" else P()


def param_shardings(shapes: Mapping[str, Any], mesh: Mesh,
                    rules: Sequence[tuple[str, str]] | None = None) -> Any:
  """NamedShardings for model variables (from `jax.eval_shape`) by (regex, strategy) rules.

  Args:
    shapes: {'params': ..., <other collections, e.g. 'batch_stats'>: ...}.
    mesh: the device mesh.
    rules: (regex, 'fsdp' | 'replicate') over parameter paths without the collection name
      ('head/kernel'); the first full match wins, every parameter must match a rule and every
      rule a parameter. Other collections (BatchNorm statistics) follow the same rules where
      one matches, else are replicated. Default: everything 'fsdp'.

  Raises:
    ValueError: for an unknown strategy, a parameter no rule matches, or a rule that matches
      no parameter (naming it and the closest paths).
  """
  rules = param_paths.rule_pairs(rules or DEFAULT_SHARDING_RULES, "Sharding rule")
  for _, strategy in rules:
    if strategy not in SHARDING_STRATEGIES:
      raise ValueError(f"Unknown sharding strategy {strategy!r}; valid: {list(SHARDING_STRATEGIES)}")
  assignment = param_paths.match_rules(shapes["params"], rules, what="sharding rule")
  out = {}
  for collection, tree in shapes.items():
    for path, leaf in param_paths.flatten(tree).items():
      if collection == "params":
        strategy = rules[assignment[path]][1]
      else:
        strategy = next((s for rx, s in rules if re.fullmatch(rx, path)), "replicate")
      out[f"{collection}/{path}"] = NamedSharding(mesh, _strategy_spec(strategy,
                                                                        tuple(leaf.shape), mesh))
  return param_paths.unflatten(out)


def optimizer_shardings(tx: optax.GradientTransformation, opt_shapes: Any,
                        param_sharding_tree: Any, mesh: Mesh) -> Any:
  """Shardings of an optimizer state: each moment takes its parameter's sharding.

  optax's `tree_map_params` finds the copies of the parameter tree inside the state (Adam's mu
  and nu, ...), so a moment follows its parameter's rule whatever its shape; the rest (step
  counts) is replicated.
  """
  return optax.tree_utils.tree_map_params(
      tx, lambda _, sharding: sharding, opt_shapes, param_sharding_tree,
      transform_non_params=lambda _: replicated(mesh))


def replicated(mesh: Mesh) -> NamedSharding:
  """A sharding that places a full copy on every device."""
  return NamedSharding(mesh, P())


def global_batch(local_batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Builds one global batch from every process's local shard, sharded over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}
