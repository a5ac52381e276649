"""The fake-model tier: exactly known scores through the real evaluators (scenic train_lib idea).

A synthetic MedMNIST-layout archive holds, in the first pixels of each image's top row, the
integers x_k of its scores (each x_k / 128, so every score is exact in float32 and the
multi-class scores sum to exactly 1). The fake `predict_fn` reads them back. Evaluators are built
as a run builds them (`fm_adapt.evaluators.make_evaluators` on the npz dataset, the mesh, the
grain evaluation loader with a padded last batch), and every metric they yield must equal
scikit-learn's on the known arrays, padding excluded, to 1e-12.
"""
import pathlib

import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from sklearn import metrics as skm

from data_pipelines import datasets
from fm_adapt import config as config_lib
from fm_adapt import evaluators as evaluators_lib
from fm_adapt.train import mesh as mesh_lib

DENOMINATOR = 128  # A power of two: x / 128 is exact, and so is a sum of such scores.
BATCH = 8  # Divides neither split: both end in a padded batch.
SIZES = {"train": 16, "val": 21, "test": 13}
TASKS = {
    "binary": ("multiclass", ("normal", "pneumonia")),
    "multiclass": ("multiclass", ("a", "b", "c", "d")),
    "multilabel": ("multilabel", ("effusion", "pleural thickening", "mass")),
}


def _multiclass_split(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  """Labels cycling through every class; integer scores summing to 128, leaning to the label."""
  labels = np.arange(n) % k
  rng.shuffle(labels)
  scores = np.empty((n, k), np.int64)
  for i, label in enumerate(labels):
    cuts = np.sort(rng.choice(np.arange(1, DENOMINATOR), size=k - 1, replace=False))
    parts = np.diff(np.concatenate([[0], cuts, [DENOMINATOR]]))
    if rng.random() < 0.6:  # Often (not always) the largest part goes to the true class.
      parts = np.sort(parts)
      parts[[label, k - 1]] = parts[[k - 1, label]]
    else:
      rng.shuffle(parts)
    scores[i] = parts
  return labels, scores


def _multilabel_split(rng: np.random.Generator, n: int, k: int) -> tuple[np.ndarray, np.ndarray]:
  """0/1 labels with both values for every label; scores in 1..127, some exactly 64 (p = 0.5)."""
  labels = (np.arange(n)[:, None] + np.arange(k)[None, :]) % 2
  labels = labels[rng.permutation(n)]
  noise = rng.integers(-50, 40, size=(n, k))
  scores = np.clip(64 + 20 * (2 * labels - 1) + noise, 1, DENOMINATOR - 1)
  scores[rng.random((n, k)) < 0.1] = 64  # The threshold itself: 0.5 is not > 0.5.
  return labels, scores


def _images(rng: np.random.Generator, scores: np.ndarray) -> np.ndarray:
  images = rng.integers(0, 256, size=(len(scores), 28, 28)).astype(np.uint8)
  images[:, 0, :scores.shape[1]] = scores
  return images


def _write_npz(path: pathlib.Path, kind: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Writes the archive of `kind`; returns {split: (labels, probabilities)}."""
  task, names = TASKS[kind]
  rng = np.random.default_rng(list(TASKS).index(kind))
  arrays, known = {}, {}
  for split, n in SIZES.items():
    make = _multilabel_split if task == "multilabel" else _multiclass_split
    labels, scores = make(rng, n, len(names))
    arrays[f"{split}_images"] = _images(rng, scores)
    arrays[f"{split}_labels"] = labels if task == "multilabel" else labels[:, None]
    known[split] = (labels, scores / DENOMINATOR)
  np.savez(path, **arrays)
  return known


def _fake_predict(num_classes: int):
  def predict(train_state, images):
    del train_state
    return images[:, 0, :num_classes, 0] / DENOMINATOR

  return predict


def _build(tmp_path: pathlib.Path, kind: str):
  """The evaluators of a run on the archive of `kind`, built as `build_run` builds them."""
  known = _write_npz(tmp_path / f"{kind}.npz", kind)
  task, names = TASKS[kind]
  config = config_lib.base_config()
  config.input.update(dict(
      data=dict(name="npz", path=str(tmp_path / f"{kind}.npz"), task=task, class_names=names,
                tfds_dir=str(tmp_path / "tfds")),
      pp="", batch_size=BATCH))
  config.evals = ml_collections.ConfigDict(dict(
      val=dict(name="classification", split="val"),
      test=dict(name="classification", split="test", periodic=False)))
  _, spec = datasets.get_dataset(config.input.data, "train", tmp_path)
  mesh = mesh_lib.make_mesh(config.mesh)
  evals, _ = evaluators_lib.make_evaluators(config, tmp_path, spec,
                                            _fake_predict(len(names)), mesh)
  return evals, known


def _per_class(truth: np.ndarray, scores: np.ndarray, pred: np.ndarray, names) -> dict:
  """auc_<c>, sens_<c>, spec_<c> from (N, K) 0/1 truth, scores and 0/1 predictions."""
  out = {}
  for k, name in enumerate(names):
    name = name.replace(" ", "_")
    out[f"auc_{name}"] = skm.roc_auc_score(truth[:, k], scores[:, k])
    out[f"sens_{name}"] = skm.recall_score(truth[:, k], pred[:, k])
    out[f"spec_{name}"] = skm.recall_score(1 - truth[:, k], 1 - pred[:, k])
  return out


def _oracle(kind: str, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
  """The expected metrics, straight from scikit-learn (the MedMNIST v2 conventions)."""
  _, names = TASKS[kind]
  k = len(names)
  if kind == "multilabel":
    pred = (probs > 0.5).astype(int)
    mean = lambda fn: np.mean([fn(labels[:, j], pred[:, j]) for j in range(k)])
    out = {"acc": mean(skm.accuracy_score),
           "auc": skm.roc_auc_score(labels, probs, average="macro"),
           "bal_acc": mean(skm.balanced_accuracy_score),
           "mcc": mean(skm.matthews_corrcoef)}
    return {**out, **_per_class(labels, probs, pred, names)}
  argmax = probs.argmax(-1)
  auc = (skm.roc_auc_score(labels, probs[:, 1]) if k == 2 else
         skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
  out = {"acc": skm.accuracy_score(labels, argmax), "auc": auc,
         "bal_acc": skm.balanced_accuracy_score(labels, argmax),
         "mcc": skm.matthews_corrcoef(labels, argmax)}
  one_hot = np.eye(k, dtype=int)
  return {**out, **_per_class(one_hot[labels], probs, one_hot[argmax], names)}


def _padded(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """The arrays an evaluator that kept the padding would score (copies of example 0)."""
  pad = -len(labels) % BATCH
  return (np.concatenate([labels, np.repeat(labels[:1], pad, axis=0)]),
          np.concatenate([probs, np.repeat(probs[:1], pad, axis=0)]))


@pytest.mark.parametrize("kind", list(TASKS))
def test_fake_model_metrics_equal_sklearn_with_padded_last_batch(tmp_path, kind):
  evals, known = _build(tmp_path, kind)
  assert set(evals) == {"val", "test"}
  for split, evaluator in evals.items():
    labels, probs = known[split]
    assert len(labels) % BATCH, "the split must end in a padded batch"
    got_labels, got_probs = evaluator.predict({})
    np.testing.assert_array_equal(got_labels, labels)  # Every real example, once, in order.
    np.testing.assert_array_equal(got_probs, probs)
    got = dict(evaluator.run({}))
    expected = _oracle(kind, labels, probs)
    assert got.pop("num_examples") == len(labels)
    assert sorted(got) == sorted(expected), split
    for name, value in expected.items():
      assert got[name] == pytest.approx(value, abs=1e-12, rel=0), (split, name)
    # The figures tell padding apart: an evaluator that scored it would fail above.
    with_padding = _oracle(kind, *_padded(labels, probs))
    assert any(abs(with_padding[m] - expected[m]) > 1e-6 for m in ("acc", "auc", "mcc")), split
