"""The pure pieces of seeds as one program (`fm_adapt.train.stacked`): keys whose random bits
are each seed's own under vmap, stacking and slicing states (a shared frozen base kept once), the
vmapped update against K single updates (traced once; on 1 and on 4 simulated devices), and the
stacked data iterator's checkpointable state."""
import json
import os
import pathlib
import subprocess
import sys
import textwrap

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from data_pipelines import loader
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import stacked
from fm_adapt.train import step as step_lib

REPO = pathlib.Path(__file__).resolve().parents[3]
SEEDS = (0, 5, 7)


def _draws(key):
  """What a training step draws from its key: fold_in the step, dropout bits, a split."""
  key = jax.random.fold_in(key, 3)
  mask = jax.random.bernoulli(key, 0.7, (4, 5))
  return mask, jax.random.normal(jax.random.split(key)[1], (3,))


def test_vmap_exact_keys_give_each_seed_its_own_bits():
  keys = [jax.random.key(s, impl="rbg") for s in SEEDS]
  alone = [_draws(k) for k in keys]
  exact = stacked.vmap_exact_keys(keys)
  together = jax.jit(jax.vmap(_draws))(exact)
  nested = jax.jit(jax.vmap(jax.vmap(_draws)))(
      jax.random.wrap_key_data(jnp.stack([jax.random.key_data(exact)] * 2),
                               impl=jax.random.key_impl(exact)))
  for k, (mask, normal) in enumerate(alone):
    np.testing.assert_array_equal(together[0][k], mask)
    np.testing.assert_array_equal(together[1][k], normal)
    np.testing.assert_array_equal(nested[0][1, k], mask)
  # Seeds draw different masks (a repeated key would hide an error above).
  assert not np.array_equal(alone[0][0], alone[1][0])


def test_vmap_exact_keys_keep_other_implementations():
  keys = [jax.random.key(s, impl="threefry2x32") for s in SEEDS]
  exact = stacked.vmap_exact_keys(keys)
  assert str(jax.random.key_impl(exact)) == "threefry2x32"
  np.testing.assert_array_equal(jax.vmap(_draws)(exact)[0][2], _draws(keys[2])[0])
  with pytest.raises(ValueError, match="different implementations"):
    stacked.vmap_exact_keys([keys[0], jax.random.key(1, impl="rbg")])


def _mesh():
  return mesh_lib.make_mesh([("data", -1), ("fsdp", 1)])


def _state(seed: int, mesh, frozen_seed: int = 0) -> dict:
  """A train state of a linear classifier (8 -> 3), sharded over the mesh as a run's is."""
  w = jax.random.normal(jax.random.key(seed), (8, 3)) * 0.3
  params = {"dense": {"kernel": w, "bias": jnp.zeros((3,))}}
  frozen = {"scale": jnp.full((8,), 1.0 + frozen_seed)}
  tx = optax.adam(1e-1)
  shardings = mesh_lib.param_shardings({"params": params}, mesh)["params"]
  params = jax.device_put(params, shardings)
  frozen = jax.device_put(frozen, mesh_lib.replicated(mesh))
  opt_shardings = mesh_lib.optimizer_shardings(tx, jax.eval_shape(tx.init, params), shardings,
                                               mesh)
  opt = jax.jit(tx.init, out_shardings=opt_shardings)(params)
  return {"params": params, "frozen": frozen, "model_state": {}, "opt": opt,
          "step": jax.device_put(jnp.zeros((), jnp.int32), mesh_lib.replicated(mesh))}


def test_stack_and_unstack_round_trip_with_a_shared_frozen_base():
  mesh = _mesh()
  states = [_state(s, mesh) for s in SEEDS]
  together, axes = stacked.stack_states(states)
  assert axes == {"params": 0, "frozen": None, "model_state": 0, "opt": 0, "step": 0}
  assert together["params"]["dense"]["kernel"].shape == (3, 8, 3)
  assert together["frozen"]["scale"].shape == (8,)  # Kept once.
  for k, state in enumerate(states):
    one = stacked.unstack_state(together, axes, k)
    chex.assert_trees_all_equal(one, state)
    assert jax.tree.map(lambda x: x.sharding, one) == jax.tree.map(lambda x: x.sharding, state)


def test_frozen_parameters_that_differ_are_stacked():
  mesh = _mesh()
  states = [_state(s, mesh, frozen_seed=s) for s in SEEDS]
  together, axes = stacked.stack_states(states)
  assert axes["frozen"] == 0
  assert together["frozen"]["scale"].shape == (3, 8)
  chex.assert_trees_all_equal(stacked.unstack_state(together, axes, 2)["frozen"],
                              states[2]["frozen"])


def _update_fn(grad_accum_steps: int = 1):
  """`step.make_update_fn` of a linear model with dropout on its inputs."""

  def apply_fn(params, model_state, images, *, train, rng, mask=None):
    del mask
    x = images.reshape(images.shape[0], -1) * params["scale"]
    if train:
      x = jnp.where(jax.random.bernoulli(rng, 0.7, x.shape), x / 0.7, 0.0)
    return x @ params["dense"]["kernel"] + params["dense"]["bias"], {}, model_state

  def loss_fn(logits, labels, mask):
    losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1)

  return step_lib.make_update_fn(apply_fn, loss_fn, optax.adam(1e-1), lambda s: 1e-1,
                                 grad_accum_steps=grad_accum_steps)


def _batches(seed: int, steps: int) -> list[dict]:
  rng = np.random.default_rng(seed)
  return [{"image": rng.normal(size=(8, 8, 1)).astype(np.float32),
           "label": rng.integers(0, 3, size=8).astype(np.int32),
           "mask": np.arange(8) < 6} for _ in range(steps)]


@pytest.mark.parametrize("grad_accum_steps", [1, 2])
def test_stacked_update_equals_single_updates_and_traces_once(grad_accum_steps):
  """Also with gradient accumulation (a scan over micro-batches, a `cond` that skips one
  without real rows: batched, both branches run and the mask selects)."""
  chex.clear_trace_counter()  # Counted per footprint: the other parameter's trace too.
  mesh = _mesh()
  update_fn = _update_fn(grad_accum_steps)
  keys = [jax.random.key(100 + s, impl="rbg") for s in SEEDS]
  batches = [_batches(s, 3) for s in SEEDS]
  single = step_lib.jit_update(update_fn, _state(0, mesh), mesh)
  want = []
  for k, seed in enumerate(SEEDS):
    state = _state(seed, mesh)
    for batch in batches[k]:
      state, _ = single(state, keys[k], mesh_lib.global_batch(batch, mesh))
    want.append(state)

  together, axes = stacked.stack_states([_state(s, mesh) for s in SEEDS])
  update = stacked.jit_stacked_update(chex.assert_max_traces(update_fn, n=1), together, axes,
                                      mesh)
  rngs = stacked.vmap_exact_keys(keys)
  for step in range(3):
    batch = {name: np.stack([batches[k][step][name] for k in range(len(SEEDS))])
             for name in batches[0][step]}
    together, measurements = update(together, rngs, stacked.stacked_batch(batch, mesh))
  assert measurements["loss"].shape == (len(SEEDS),)
  for k, state in enumerate(want):
    one = stacked.unstack_state(together, axes, k)
    chex.assert_trees_all_close(one["params"], state["params"], rtol=1e-6, atol=1e-7)
    assert int(one["step"]) == 3


_DEVICES_SCRIPT = textwrap.dedent("""
    import json, runpy, sys
    import jax, numpy as np
    from fm_adapt.train import mesh as mesh_lib, stacked
    t = runpy.run_path(sys.argv[1])  # This test file: its model, states and batches.
    mesh = mesh_lib.make_mesh(MESH)
    update_fn = t["_update_fn"]()
    keys = [jax.random.key(100 + s, impl="rbg") for s in t["SEEDS"]]
    together, axes = stacked.stack_states([t["_state"](s, mesh) for s in t["SEEDS"]])
    update = stacked.jit_stacked_update(update_fn, together, axes, mesh)
    batches = [t["_batches"](s, 2) for s in t["SEEDS"]]
    losses = []
    for step in range(2):
      batch = {n: np.stack([b[step][n] for b in batches]) for n in batches[0][step]}
      together, m = update(together, stacked.vmap_exact_keys(keys),
                           stacked.stacked_batch(batch, mesh))
      losses.append(np.asarray(m["loss"]).tolist())
    kernel = together["params"]["dense"]["kernel"]
    print("OUT", json.dumps(dict(losses=losses, kernel=np.asarray(kernel).tolist(),
                                 spec=list(kernel.sharding.spec), devices=jax.device_count())))
""")


def _run_devices(devices: int, mesh: str) -> dict:
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} "
             + os.environ["FM_ADAPT_TEST_XLA_FLAGS"],
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  out = subprocess.run([sys.executable, "-c", _DEVICES_SCRIPT.replace("MESH", mesh), __file__],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  line = next(l for l in out.stdout.splitlines() if l.startswith("OUT "))
  return json.loads(line[4:])


def test_stacked_update_on_4_devices_equals_1():
  """data=2 x fsdp=2: the kernel [K, 8, 3] sharded over fsdp along 8, the seed axis whole, the
  batch over both axes; the same losses and parameters as on one device."""
  one = _run_devices(1, "[('data', -1), ('fsdp', 1)]")
  four = _run_devices(4, "[('data', 2), ('fsdp', 2)]")
  assert four["devices"] == 4 and four["spec"] == [None, "fsdp", None]
  np.testing.assert_allclose(four["losses"], one["losses"], rtol=1e-6)
  np.testing.assert_allclose(four["kernel"], one["kernel"], rtol=1e-6, atol=1e-7)


def _loader(seed: int):
  source = [{"image": np.full((2, 2, 1), i, np.uint8), "label": np.array([i % 2])}
            for i in range(10)]
  return loader.make_epoch_loader(source, pp="value_range(-1,1)", batch_size=4, seed=seed)


def test_stacked_iterator_stacks_and_resumes():
  fresh = stacked.StackedIterator([iter(_loader(s)) for s in SEEDS], SEEDS)
  first = next(fresh)
  assert first["image"].shape == (3, 4, 2, 2, 1) and first["mask"].shape == (3, 4)
  assert not np.array_equal(first["image"][0], first["image"][1])  # Each seed its own order.
  next(fresh)
  state = fresh.get_state()
  want = [next(fresh) for _ in range(3)]  # Into the next epoch (3 batches an epoch).

  resumed = stacked.StackedIterator([iter(_loader(s)) for s in SEEDS], SEEDS)
  resumed.set_state(state)
  for batch in want:
    got = next(resumed)
    for name in batch:
      np.testing.assert_array_equal(got[name], batch[name])
  other = stacked.StackedIterator([iter(_loader(s)) for s in (0, 5)], (0, 5))
  with pytest.raises(ValueError, match=r"seeds \[0, 5, 7\], this run has \[0, 5\]"):
    other.set_state(state)


def test_stacked_sharding_needs_the_runs_mesh():
  with pytest.raises(TypeError, match="NamedSharding"):
    stacked.stacked_sharding(jax.sharding.SingleDeviceSharding(jax.devices()[0]))
  mesh = _mesh()
  sharding = stacked.stacked_sharding(NamedSharding(mesh, P("fsdp", None)))
  assert sharding.spec == P(None, "fsdp", None)
  assert stacked.unstacked_sharding(sharding).spec == P("fsdp", None)
