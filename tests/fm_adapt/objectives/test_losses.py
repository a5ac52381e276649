"""Tests of the classification objectives."""
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fm_adapt.objectives import classification as objectives


def test_softmax_xent_masked_mean():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [5.0, -5.0]])
  labels = jnp.array([0, 0, 1])
  mask = jnp.array([True, True, False])
  expected = np.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:2], labels[:2]))
  assert objectives.softmax_xent(logits, labels, mask) == pytest.approx(float(expected), rel=1e-6)


def test_sigmoid_xent_matches_optax():
  logits = jnp.array([[1.0, -2.0, 0.5]])
  labels = jnp.array([[1, 0, 1]])
  per_label = optax.sigmoid_binary_cross_entropy(logits, labels.astype(jnp.float32))
  got = objectives.sigmoid_xent(logits, labels, jnp.array([True]), label_reduction="sum")
  assert float(got) == pytest.approx(float(per_label.sum()), rel=1e-6)


def test_sigmoid_xent_default_is_torch_bce_with_logits_mean():
  """The default is PyTorch's BCEWithLogitsLoss(): mean over labels and real examples."""
  torch = pytest.importorskip("torch")
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(6, 14)).astype(np.float32)
  labels = rng.integers(0, 2, (6, 14))
  mask = np.array([True] * 4 + [False] * 2)
  want = torch.nn.BCEWithLogitsLoss()(torch.tensor(logits[:4]), torch.tensor(labels[:4]).float())
  got = objectives.sigmoid_xent(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask))
  assert float(got) == pytest.approx(float(want), rel=1e-5)
  with pytest.raises(ValueError, match="label_reduction 'max'"):
    objectives.sigmoid_xent(jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(mask),
                            label_reduction="max")


def test_logit_adjustment_shifts_by_log_prior():
  logits = jnp.zeros((1, 2))
  got = objectives.logit_adjusted_xent(logits, jnp.array([0]), jnp.array([True]),
                                       class_priors=[0.9, 0.1])
  assert float(got) == pytest.approx(-np.log(0.9), rel=1e-5)


def test_get_loss_errors():
  with pytest.raises(ValueError, match="valid"):
    objectives.get_loss("nope", "multiclass")
  with pytest.raises(ValueError, match="does not fit"):
    objectives.get_loss("softmax_xent", "multilabel")
  assert objectives.get_loss(None, "multilabel") is not None
