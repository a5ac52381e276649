"""Tests of fm_adapt.train.state: a pretrained load keeps every variable's sharding.

Across processes (fsdp spanning hosts, where no process may read another's shards) it is tested
by tests/fm_adapt/train/test_multiprocess_fsdp.py.
"""
import jax
import numpy as np
import pytest

from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import state as state_lib


def _init(rng):
  return {"params": {"body": {"kernel": jax.random.normal(rng, (4, 8))},
                     "head": {"kernel": jax.random.normal(rng, (8, 2))}}}


def test_loaded_variables_keep_kept_leaves_and_place_loaded_ones_in_their_sharding():
  mesh = mesh_lib.make_mesh()
  variables = state_lib.sharded_init(_init, jax.random.key(0), mesh)
  body = np.arange(32, dtype=np.float64).reshape(4, 8)  # Cast to the init's float32.
  load = lambda v: {"params": {"body": {"kernel": body}, "head": v["params"]["head"]}}
  out = state_lib.loaded_variables(load, variables)
  head, new_body = out["params"]["head"]["kernel"], out["params"]["body"]["kernel"]
  assert head is variables["params"]["head"]["kernel"]
  assert new_body.sharding == variables["params"]["body"]["kernel"].sharding
  assert new_body.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(new_body), body.astype(np.float32))


def test_a_load_that_changes_the_variables_is_an_error():
  mesh = mesh_lib.make_mesh()
  variables = state_lib.sharded_init(_init, jax.random.key(0), mesh)
  with pytest.raises(ValueError, match=r"missing \['params/head/kernel'\]"):
    state_lib.loaded_variables(lambda v: {"params": {"body": v["params"]["body"]}}, variables)
  with pytest.raises(ValueError, match=r"params/body/kernel the shape \(2, 8\); the model's is "
                                       r"\(4, 8\)"):
    state_lib.loaded_variables(
        lambda v: {"params": {"body": {"kernel": np.zeros((2, 8))}, "head": v["params"]["head"]}},
        variables)
