"""K training runs that differ only in seed, as one program: the pure pieces.

The K train states are stacked on a leading axis and one update, `jax.vmap(update_fn)`, steps
them all; each seed keeps its own initial parameters, data order and dropout keys, so seed k of
the stacked program follows the run of seed k alone (to float rounding: a batched matmul may sum
in another order than K single ones).

  stack_states(states)      -> (stacked state, axes): every leaf [K, ...]; frozen parameters
                               that are equal for all seeds (a pretrained base) are kept once
                               (axis None) instead of K times.
  unstack_state(s, axes, k) -> seed k's state, in the single run's shardings.
  vmap_exact_keys(keys)     -> the seeds' training keys, stacked, with random bits that are the
                               same under vmap as without (see below).
  jit_stacked_update(...)   -> jax.jit(jax.vmap(update_fn)), the state donated.
  StackedIterator           -> K per-seed data iterators giving [K, B, ...] batches, with one
                               checkpointable state (grain's orbax handler saves it per process).
  stacked_batch(batch, mesh) -> the [K, B, ...] host batch on the mesh: K unsharded, B as the
                               single run shards its batch.

Why `vmap_exact_keys`: a run's keys are 'rbg' keys (`build.build_run`), whose random bits come
from XLA's RngBitGenerator. JAX batches that op by drawing K times the bits from the FIRST key
of the batch (`_rng_bit_generator_batching_rule`; the 'rbg' column "exact jax.vmap over keys"
of the `jax.random` docs is empty), so under a plain vmap every seed's dropout would come from
seed 0's key stream. The same key data wrapped in `RBG_VMAP_EXACT` (rbg's seed, split and
fold_in; its random bits drawn key by key under vmap) gives each seed the bits its own run draws.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching
from jax.extend import random as jax_random
from jax.sharding import NamedSharding, PartitionSpec as P

from fm_adapt.train import mesh as mesh_lib

_RBG = jax_random.rbg_prng_impl


def _rbg_bits_vmap_exact(key: jax.Array, bit_width: int, shape: Sequence[int]) -> jax.Array:
  """rbg's random bits of one key (uint32[4]); under vmap, each key's own bits."""

  @custom_batching.custom_vmap
  def draw(key):
    return _RBG.random_bits(key, bit_width, shape)

  @draw.def_vmap
  def _per_key(axis_size, in_batched, keys):
    del in_batched
    return jnp.stack([draw(keys[i]) for i in range(axis_size)]), True

  return draw(key)


RBG_VMAP_EXACT = jax_random.define_prng_impl(
    key_shape=_RBG.key_shape, seed=_RBG.seed, split=_RBG.split,
    random_bits=_rbg_bits_vmap_exact, fold_in=_RBG.fold_in, name="rbg_vmap_exact",
    tag="rbgx")


def vmap_exact_keys(keys: Sequence[jax.Array]) -> jax.Array:
  """The K keys stacked [K], as keys whose random bits are the same under vmap as alone.

  'rbg' keys are re-wrapped in `RBG_VMAP_EXACT` (same key data, same bits per key); keys of
  the other built-in implementations (threefry, unsafe_rbg) are exact under vmap already and
  are only stacked.
  """
  impls = {str(jax.random.key_impl(k)) for k in keys}
  if len(impls) != 1:
    raise ValueError(f"The seeds' keys have different implementations {sorted(impls)}.")
  data = jnp.stack([jax.random.key_data(k) for k in keys])
  impl = RBG_VMAP_EXACT if impls == {"rbg"} else jax.random.key_impl(keys[0])
  return jax.random.wrap_key_data(data, impl=impl)


def stacked_sharding(sharding: jax.sharding.Sharding) -> NamedSharding:
  """The sharding of [K, *shape] for a leaf of `sharding`: the seed axis unsharded."""
  if not isinstance(sharding, NamedSharding):
    raise TypeError(f"A stacked state needs NamedSharding leaves (the run's mesh); got {sharding}.")
  return NamedSharding(sharding.mesh, P(None, *sharding.spec))


def unstacked_sharding(sharding: jax.sharding.Sharding) -> NamedSharding:
  """The sharding of one seed's leaf of a stacked leaf of `sharding` (the inverse of
  `stacked_sharding`)."""
  spec = tuple(sharding.spec)
  return NamedSharding(sharding.mesh, P(*spec[1:]))


def _shardings(tree: Any, fn: Callable[[Any], NamedSharding]) -> Any:
  return jax.tree.map(lambda x: fn(x.sharding), tree)


def _trees_equal(trees: Sequence[Any]) -> bool:
  """Whether every tree equals the first one, leaf by leaf (bitwise)."""
  first = trees[0]
  for other in trees[1:]:
    if jax.tree.structure(other) != jax.tree.structure(first):
      return False
    same = jax.jit(lambda a, b: jnp.all(jnp.stack(
        [jnp.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))] or
        [jnp.array(True)])))(first, other)
    if not bool(same):
      return False
  return True


def stack_states(states: Sequence[Mapping[str, Any]]
                 ) -> tuple[dict[str, Any], dict[str, int | None]]:
  """Stacks K train states (`fm_adapt.train.state`) on a new leading axis.

  Returns:
    (stacked state, axes): `axes[key]` is 0 for a stacked entry and None for `frozen` when
    every seed's frozen parameters are equal (kept once, shared by the seeds: a pretrained base
    is not held K times). `axes` is the state's `in_axes` / `out_axes` for `jax.vmap`.
  """
  if not states:
    raise ValueError("stack_states needs at least one state.")
  keys = list(states[0])
  if any(list(s) != keys for s in states):
    raise ValueError(f"The states have different entries: {[sorted(s) for s in states]}.")
  axes = {k: 0 for k in keys}
  if "frozen" in axes and _trees_equal([s["frozen"] for s in states]):
    axes["frozen"] = None
  stacked_keys = [k for k in keys if axes[k] == 0]
  parts = [{k: s[k] for k in stacked_keys} for s in states]
  out_shardings = _shardings(parts[0], stacked_sharding)
  stacked = jax.jit(lambda parts: jax.tree.map(lambda *xs: jnp.stack(xs), *parts),
                    out_shardings=out_shardings)(parts)
  stacked.update({k: states[0][k] for k in keys if axes[k] is None})
  return {k: stacked[k] for k in keys}, axes


def unstack_state(stacked: Mapping[str, Any], axes: Mapping[str, int | None], index: int
                  ) -> dict[str, Any]:
  """Seed `index`'s train state of a stacked state, in the single run's shardings."""
  parts = {k: v for k, v in stacked.items() if axes[k] == 0}
  take = _take_fn(tuple(parts), jax.tree.structure(parts),
                  tuple(unstacked_sharding(x.sharding) for x in jax.tree.leaves(parts)))
  one = take(parts, jnp.asarray(index, jnp.int32))
  return {k: one[k] if axes[k] == 0 else stacked[k] for k in stacked}


_TAKE_CACHE: dict[Any, Callable[..., Any]] = {}


def _take_fn(keys: tuple[str, ...], structure: Any, shardings: tuple[Any, ...]
             ) -> Callable[..., Any]:
  """One jitted `take(parts, index)` per state layout (the index is traced: one compile for
  every seed)."""
  cache_key = (keys, structure, shardings)
  if cache_key not in _TAKE_CACHE:
    out = jax.tree.unflatten(structure, list(shardings))
    _TAKE_CACHE[cache_key] = jax.jit(
        lambda parts, i: jax.tree.map(lambda x: x[i], parts), out_shardings=out)
  return _TAKE_CACHE[cache_key]


def stacked_batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """[K, B, ...]: the seed axis unsharded, the batch axis as `mesh.batch_sharding` shards it."""
  return NamedSharding(mesh, P(None, mesh.axis_names))


def stacked_batch(local_batch: Mapping[str, np.ndarray], mesh: jax.sharding.Mesh
                  ) -> dict[str, jax.Array]:
  """One global [K, B, ...] batch from every process's [K, B_local, ...] share."""
  sharding = stacked_batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def jit_stacked_update(update_fn: Callable[..., Any], stacked: Mapping[str, Any],
                       axes: Mapping[str, int | None], mesh: jax.sharding.Mesh
                       ) -> Callable[..., Any]:
  """`jax.jit(jax.vmap(update_fn))` over (stacked state, [K] keys, [K, B, ...] batch).

  The state keeps its shardings and is donated (as `step.jit_update` does for one run); the
  keys and the [K] measurements are replicated.
  """
  shardings = jax.tree.map(lambda x: x.sharding, dict(stacked))
  replicated = mesh_lib.replicated(mesh)
  vmapped = jax.vmap(update_fn, in_axes=(dict(axes), 0, 0), out_axes=(dict(axes), 0))
  return jax.jit(vmapped, donate_argnums=(0,),
                 in_shardings=(shardings, replicated, stacked_batch_sharding(mesh)),
                 out_shardings=(shardings, replicated))


class StackedIterator:
  """K per-seed data iterators as one: `next` gives the seeds' batches stacked [K, B, ...].

  Its state (`get_state` / `set_state`, bytes of JSON) holds every seed's iterator state under
  its seed, so grain's orbax `CheckpointHandler` saves and restores it per process as it does a
  single iterator (`checkpoint.RunCheckpointer`).
  """

  def __init__(self, iterators: Sequence[Any], seeds: Sequence[int]):
    if len(iterators) != len(seeds):
      raise ValueError(f"{len(iterators)} iterators for {len(seeds)} seeds.")
    self._iterators = list(iterators)
    self.seeds = [int(s) for s in seeds]

  def __iter__(self) -> "StackedIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    batches = [next(it) for it in self._iterators]
    return {k: np.stack([np.asarray(b[k]) for b in batches]) for k in batches[0]}

  def get_state(self) -> bytes:
    states = [_jsonable_state(it.get_state()) for it in self._iterators]
    return json.dumps({"seeds": self.seeds, "iterators": states}).encode()

  def set_state(self, state: bytes) -> None:
    saved = json.loads(state)
    if saved.get("seeds") != self.seeds:
      raise ValueError(f"The saved data-iterator state is of the seeds {saved.get('seeds')}, "
                       f"this run has {self.seeds}.")
    for it, one in zip(self._iterators, saved["iterators"]):
      it.set_state(one["bytes"].encode() if isinstance(one, dict) and "bytes" in one
                   and len(one) == 1 else one)

  def start_prefetch(self) -> None:
    for it in self._iterators:
      if hasattr(it, "start_prefetch"):
        it.start_prefetch()


def _jsonable_state(state: Any) -> Any:
  """A grain iterator's state as JSON: a dataset iterator's dict as is, an older iterator's
  bytes as {'bytes': text}."""
  return {"bytes": state.decode()} if isinstance(state, bytes) else state
