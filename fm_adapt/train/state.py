"""The train state: its creation, the part a checkpoint holds, and the full parameters.

`train_state` is a plain dict:
  params       the trainable parameters (the only tree that is differentiated),
  frozen       the frozen parameters (inputs only: XLA never forms their weight gradients),
  model_state  mutable collections such as BatchNorm 'batch_stats' ({} for a ViT),
  opt          the optimizer state of `params` only,
  step         int32 scalar.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fm_adapt import param_paths
from fm_adapt.train import mesh as mesh_lib


def split_variables(variables: Mapping[str, Any], trainable: Mapping[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """Splits model variables into (trainable params, frozen params, model_state)."""
  params, frozen = param_paths.split(variables["params"], trainable)
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return params, frozen, model_state


def sharded_init(init_fn, rng: jax.Array, mesh: jax.sharding.Mesh,
                 rules: Any = None) -> dict[str, Any]:
  """Initializes variables directly in their sharded layout (`eval_shape`, then jit)."""
  shapes = jax.eval_shape(init_fn, rng)
  shardings = mesh_lib.param_shardings(shapes, mesh, rules)
  return jax.jit(init_fn, out_shardings=shardings)(rng)


def initial_state(fns: Any, variables: dict[str, Any], mesh: jax.sharding.Mesh
                  ) -> dict[str, Any]:
  """The train state of freshly initialized (sharded) variables.

  Pretrained weights are loaded (`loaded_variables`), the variables split into trainable /
  frozen / model state, and the optimizer state is sharded like the parameters.
  """
  if fns.model_fns.load is not None:
    variables = loaded_variables(fns.model_fns.load, variables)
  params, frozen, model_state = split_variables(variables, fns.trainable)
  opt_shardings = mesh_lib.optimizer_shardings(
      fns.tx, jax.eval_shape(fns.tx.init, params), jax.tree.map(lambda x: x.sharding, params),
      mesh)
  opt = jax.jit(fns.tx.init, out_shardings=opt_shardings)(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), mesh_lib.replicated(mesh))
  return {"params": params, "frozen": frozen, "model_state": model_state, "opt": opt,
          "step": step}


def loaded_variables(load: Callable[[dict[str, Any]], dict[str, Any]],
                     variables: dict[str, Any]) -> dict[str, Any]:
  """`variables` with a pretrained checkpoint overlaid, in the same shardings.

  No process gathers the variables: with 'fsdp' spanning hosts a process holds only some shards
  of each. `load` reads only their shapes and dtypes and returns the leaves it keeps (dont_load,
  adaptation parameters) as they are; each loaded leaf (a host array of the whole value, read
  from the file by every process) is placed shard by shard, each process its own shards.
  """
  loaded = load(variables)
  flat_init, flat_loaded = param_paths.flatten(variables), param_paths.flatten(loaded)
  if set(flat_init) != set(flat_loaded):
    raise ValueError(f"The pretrained load returned other variables than the model's: missing "
                     f"{sorted(set(flat_init) - set(flat_loaded))[:20]}, unexpected "
                     f"{sorted(set(flat_loaded) - set(flat_init))[:20]}.")
  return param_paths.unflatten({p: _placed(p, flat_loaded[p], init)
                                for p, init in flat_init.items()})


def _placed(path: str, value: Any, init: jax.Array) -> jax.Array:
  """`value` in `init`'s sharding: `init` itself when kept, else built from this process's
  shards of the host array."""
  if value is init:
    return init
  host = np.asarray(value, init.dtype)
  if host.shape != init.shape:
    raise ValueError(f"The pretrained load gave {path} the shape {host.shape}; the model's is "
                     f"{init.shape}.")
  return jax.make_array_from_callback(init.shape, init.sharding, lambda index: host[index])


def checkpointed(state: Mapping[str, Any]) -> dict[str, Any]:
  """What a checkpoint holds: everything but the frozen parameters.

  Frozen parameters are rebuilt from the seed and the base checkpoint (whose sha256 is stored
  beside), so an adapted run's checkpoint is not a second copy of its base.
  """
  return {k: v for k, v in state.items() if k != "frozen"}


def full_params(state: Mapping[str, Any]) -> dict[str, Any]:
  """The model's whole parameter tree: the trainable and the frozen parameters merged."""
  return param_paths.merge(state["params"], state["frozen"])
