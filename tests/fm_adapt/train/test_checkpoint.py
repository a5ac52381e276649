"""Checkpoints: strict restore with a clear error for another model's shapes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fm_adapt.train import checkpoint as ckpt_lib


def _state(width: int, blocks: int = 1):
  params = {"encoder": {f"block_{i}": {"kernel": jnp.ones((width, width))} for i in range(blocks)}}
  return {"params": params, "model_state": {}, "opt": (jnp.zeros(()),), "step": jnp.int32(3)}


def test_roundtrip_and_best(tmp_path):
  ckpt = ckpt_lib.RunCheckpointer(tmp_path, keep=1, best_metric="val/auc")
  ckpt.save(3, _state(4), {"iterator": "{}"})
  ckpt.save_best(3, {"params": _state(4)["params"]}, {"val/auc": 0.7})
  ckpt.save_best(4, {"params": jax.tree.map(lambda x: 2 * x, _state(4)["params"])}, {"val/auc": 0.6})
  ckpt.wait()
  state, data = ckpt.restore(ckpt_lib.abstract_of(_state(4)))
  assert int(state["step"]) == 3 and data == {"iterator": "{}"}
  assert ckpt.best_step() == 3  # The worse evaluation at step 4 did not replace it.
  best = ckpt.restore_best(ckpt_lib.abstract_of({"params": _state(4)["params"]}))
  np.testing.assert_array_equal(best["params"]["encoder"]["block_0"]["kernel"], np.ones((4, 4)))
  ckpt.close()


@pytest.mark.parametrize("mode,values,saved", [
    ("max", [0.7, 0.6, 0.7, float("nan"), 0.8], [True, False, False, False, True]),
    ("min", [0.7, 0.6, 0.9], [True, True, False]),
])
def test_best_writes_only_improvements(tmp_path, mode, values, saved):
  ckpt = ckpt_lib.RunCheckpointer(tmp_path, best_metric="val/x", best_mode=mode)
  weights = {"params": _state(4)["params"]}
  assert [ckpt.save_best(i, weights, {"val/x": v}) for i, v in enumerate(values)] == saved
  assert ckpt.best_step() == max(i for i, s in enumerate(saved) if s)
  ckpt.close()


def test_resumed_best_keeps_the_saved_value(tmp_path):
  weights = {"params": _state(4)["params"]}
  first = ckpt_lib.RunCheckpointer(tmp_path, best_metric="val/auc")
  first.save_best(3, weights, {"val/auc": 0.7})
  first.wait()
  first.close()
  resumed = ckpt_lib.RunCheckpointer(tmp_path, best_metric="val/auc")
  assert not resumed.save_best(4, weights, {"val/auc": 0.65})
  assert resumed.save_best(5, weights, {"val/auc": 0.75})
  assert resumed.best_step() == 5
  resumed.close()


@pytest.mark.parametrize("other,message", [
    (_state(8), r"encoder/block_0/kernel: saved \(4, 4\) vs model \(8, 8\)"),
    (_state(4, blocks=2), r"missing from the checkpoint \(1\): \['params/encoder/block_1/kernel'\]"),
])
def test_restore_into_another_model_is_a_clear_error(tmp_path, other, message):
  ckpt = ckpt_lib.RunCheckpointer(tmp_path)
  ckpt.save(1, _state(4), {"iterator": "{}"})
  ckpt.wait()
  with pytest.raises(ValueError, match=message):
    ckpt.restore(ckpt_lib.abstract_of(other))
  ckpt.close()
