"""Tests of class-stratified, nested training subsets (data_pipelines/subsets.py)."""
import math

import numpy as np
import pytest

from data_pipelines import subsets

# 3 classes of 700, 250 and 50 examples, shuffled; and a class too rare for small fractions.
_LABELS = np.random.default_rng(7).permutation(np.repeat([0, 1, 2], [700, 250, 50]))
_RARE = np.random.default_rng(8).permutation(np.repeat([0, 1, 2, 3], [900, 80, 18, 2]))


@pytest.mark.parametrize("labels", [_LABELS, _RARE], ids=["3_classes", "rare_class"])
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.1, 0.25, 0.5, 0.9])
def test_size_and_class_proportions(labels, fraction):
  idx = subsets.stratified_subset(labels, fraction, seed=0)
  n_c = np.bincount(labels)
  k_c = np.bincount(labels[idx], minlength=n_c.size)
  assert np.all(np.diff(idx) > 0)  # Sorted, no repeats.
  assert (k_c >= 1).all()  # Every class present.
  # Each class has its share rounded (at least one), within the one example of balancing.
  want = np.maximum(1, np.floor(fraction * n_c + 0.5))
  assert np.abs(k_c - want).max() <= 1, (k_c, fraction * n_c)
  # round(fraction * N) examples, plus one per class that rounding left without any.
  added = int(sum(1 for c in range(n_c.size) if fraction * n_c[c] < 1))
  assert idx.size - math.floor(fraction * labels.size + 0.5) in range(added + 1)


def test_exact_shares_when_they_are_whole():
  idx = subsets.stratified_subset(_LABELS, 0.2, seed=3)
  assert np.bincount(_LABELS[idx]).tolist() == [140, 50, 10]


def test_a_tiny_fraction_keeps_one_example_of_every_class():
  idx = subsets.stratified_subset(_RARE, 1e-6, seed=0)
  assert sorted(_RARE[idx].tolist()) == [0, 1, 2, 3]


def test_fraction_one_is_the_whole_split():
  assert subsets.stratified_subset(_LABELS, 1.0, seed=5).tolist() == list(range(_LABELS.size))


def test_same_seed_same_subset_other_seed_another():
  a = subsets.stratified_subset(_LABELS, 0.1, seed=0)
  b = subsets.stratified_subset(_LABELS.copy().astype(np.int32), 0.1, seed=0)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, subsets.stratified_subset(_LABELS, 0.1, seed=1))


@pytest.mark.parametrize("labels", [_LABELS, _RARE], ids=["3_classes", "rare_class"])
def test_smaller_fractions_are_nested_in_larger_ones(labels):
  fractions = [1e-4, 0.001, 0.01, 0.02, 0.05, 0.1, 0.3, 0.5, 0.77, 1.0]
  subsets_ = [set(subsets.stratified_subset(labels, f, seed=4).tolist()) for f in fractions]
  for small, large in zip(subsets_, subsets_[1:]):
    assert small <= large


def _multilabel(n=2000, seed=0):
  rng = np.random.default_rng(seed)
  rates = np.array([0.3, 0.1, 0.05, 0.01, 0.002, 0.0])  # Label 5 has no positive.
  return (rng.random((n, rates.size)) < rates).astype(np.int64)


def test_multilabel_keeps_every_label_and_proportions_and_nests():
  labels = _multilabel()
  positives = labels.sum(axis=0)
  previous = set()
  for fraction in (0.0005, 0.01, 0.1, 0.5):
    idx = subsets.stratified_subset(labels, fraction, seed=2)
    got = labels[idx].sum(axis=0)
    assert ((got > 0) == (positives > 0)).all()  # Every label with a positive is present.
    assert idx.size >= math.floor(fraction * labels.shape[0] + 0.5)
    if fraction >= 0.1:  # Stratified on the rarest label: the rarer labels are near exact.
      assert np.abs(got[1:5] - fraction * positives[1:5]).max() <= 1.5
      assert abs(got[0] - fraction * positives[0]) <= 0.1 * fraction * positives[0]
    assert previous <= set(idx.tolist())
    previous = set(idx.tolist())


def test_multilabel_rows_without_labels_are_a_stratum():
  labels = np.zeros((100, 3), np.int64)
  labels[:10, 0] = 1
  idx = subsets.stratified_subset(labels, 0.5, seed=0)
  assert idx.size == 50 and labels[idx, 0].sum() == 5


@pytest.mark.parametrize("fraction", [0, -0.1, 1.01, float("nan"), True, "0.5", None])
def test_bad_fraction_is_an_error(fraction):
  with pytest.raises(ValueError, match=r"in \(0, 1\]"):
    subsets.stratified_subset(_LABELS, fraction, seed=0)


@pytest.mark.parametrize("labels, match", [
    (np.zeros((0,), np.int64), "N > 0"), (np.array([0.5, 1.0]), "dtype"),
    (np.array([-1, 0]), "negative"), (np.array([[0, 2]]), "0/1")])
def test_bad_labels_are_an_error(labels, match):
  with pytest.raises(ValueError, match=match):
    subsets.stratified_subset(labels, 0.5, seed=0)


def test_class_counts():
  assert subsets.class_counts(np.array([0, 2, 2]), 4) == [1, 0, 2, 0]
  assert subsets.class_counts(np.array([[1, 0], [1, 1]]), 2) == [2, 1]


def test_subset_view_and_repr():
  source = [{"label": i} for i in range(10)]
  view = subsets.Subset(source, np.array([2, 5, 7]), "fraction=0.3, seed=0")
  assert len(view) == 3 and [view[i]["label"] for i in range(3)] == [2, 5, 7]
  with pytest.raises(IndexError):
    view[3]  # pylint: disable=pointless-statement
  other = subsets.Subset(source, np.array([2, 5, 8]), "fraction=0.3, seed=0")
  assert "fraction=0.3, seed=0, len=3" in repr(view) and repr(view) != repr(other)
