"""Tests of optimizers from the config: schedules, freezing, no state for frozen leaves."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from fm_adapt import param_paths
from fm_adapt.train import model_fns, optim, state as state_lib, step as step_lib


class _Net(nn.Module):

  @nn.compact
  def __call__(self, x, *, train=False):
    x = nn.relu(nn.Dense(8, name="body")(x))
    logits = nn.Dense(3, name="head")(x)
    return logits, {}


def _config(schedule):
  return ml_collections.ConfigDict(dict(lr=0.1, optax_name="adam", optax={}, wd=0.0,
                                        grad_clip_norm=None, schedule=schedule))


def test_piecewise_schedule_values():
  fn = optim.make_schedule(dict(decay_type="piecewise", boundaries=(0.5, 0.75), scale=0.1), 1e-3, 100)
  np.testing.assert_allclose([fn(0), fn(49), fn(50), fn(74), fn(75), fn(99)],
                             [1e-3, 1e-3, 1e-4, 1e-4, 1e-5, 1e-5], rtol=1e-6)


def test_warmup_then_cosine():
  fn = optim.make_schedule(dict(decay_type="cosine", warmup_steps=10), 1.0, 110)
  assert float(fn(0)) == 0.0 and float(fn(10)) == pytest.approx(1.0)
  assert float(fn(110)) == pytest.approx(0.0, abs=1e-6)


def test_bad_schedule_keys():
  with pytest.raises(ValueError, match="valid keys"):
    optim.make_schedule(dict(decay="cosine"), 1.0, 10)
  with pytest.raises(ValueError, match="valid"):
    optim.make_schedule(dict(decay_type="exp"), 1.0, 10)


def test_schedule_coverage_error_lists_unmatched():
  params = _Net().init(jax.random.key(0), jnp.ones((1, 4)))["params"]
  with pytest.raises(ValueError, match=r"body/bias.*body/kernel|body/kernel.*body/bias"):
    optim.trainable_mask(params, [("head/.*", {})])


def test_frozen_params_have_no_state_and_stay_bitwise_equal():
  model = _Net()
  variables = model.init(jax.random.key(0), jnp.ones((1, 4)))
  schedule = [("head/.*", dict(decay_type="cosine")), (".*", None)]
  trainable = optim.trainable_mask(variables["params"], schedule)
  params, frozen, model_state = state_lib.split_variables(variables, trainable)
  tx, schedules = optim.make_optimizer(_config(schedule), params, total_steps=10)
  opt = tx.init(params)
  state_paths = {"/".join(str(getattr(k, "key", k)) for k in path)
                 for path, _ in jax.tree_util.tree_flatten_with_path(opt)[0]}
  assert not any("body" in p for p in state_paths), state_paths
  assert any("head" in p for p in state_paths)
  loss_fn = lambda logits, labels, mask: optax.softmax_cross_entropy_with_integer_labels(
      logits, labels).mean()
  update = jax.jit(step_lib.make_update_fn(model_fns.make_apply_fn(model), loss_fn, tx,
                                           schedules[0]))
  state = dict(params=params, frozen=frozen, model_state=model_state, opt=opt,
               step=jnp.zeros((), jnp.int32))
  before = jax.tree.map(np.asarray, frozen)
  head_before = np.asarray(params["head"]["kernel"])
  batch = dict(image=jax.random.normal(jax.random.key(1), (6, 4)), label=jnp.arange(6) % 3,
               mask=jnp.ones(6, bool))
  for _ in range(3):
    state, measurements = update(state, jax.random.key(2), batch)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, np.asarray(b)), before, state["frozen"])
  assert not np.array_equal(head_before, state["params"]["head"]["kernel"])
  assert int(state["step"]) == 3 and np.isfinite(float(measurements["loss"]))
  assert set(param_paths.flatten(state["params"])) == {"head/kernel", "head/bias"}
