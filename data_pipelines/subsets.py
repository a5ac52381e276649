"""Class-stratified, nested subsets of a training split, for label-efficiency studies.

`stratified_subset(labels, fraction, seed)` returns the sorted indices of the examples a run
with `config.input.label_fraction = fraction` trains on. It depends on the labels, the fraction
and the seed alone (never on the model or the adaptation), so every strategy of a study trains
on the same examples at a given seed. The exact rule:

1. Strata. Multi-class and ordinal labels (shape (N,), class ids): one stratum per class.
   Multi-label labels (shape (N, L), 0/1): an example's stratum is its rarest positive label (the
   one with the fewest positives in the split; ties to the lower label index); the examples with
   no positive label form one more stratum.
2. Order. One permutation of the N examples, `np.random.default_rng(seed).permutation(N)`; a
   stratum's examples are taken in the order they appear in it.
3. Apportionment. T = floor(fraction * N + 0.5) examples (round half up) are shared out among
   the strata one at a time: the next example of the stratum s with the largest
   n_s / (k_s + 0.5), where n_s is the stratum's size and k_s how many of its examples are taken
   so far (Sainte-Lague / Webster apportionment; ties to the stratum with fewer taken, then to
   the lower stratum). A stratum so gets its share fraction * n_s rounded, the roundings
   balanced so that they add up to exactly T.
4. Every class present. For each class present (multi-label: each label with a positive, rarest
   first) that none of the examples taken has, its first example in the permutation is added.

So the subset has round(fraction * N) examples, plus one for each class that rounding left out
(a class of n_c examples has max(1, round(fraction * n_c)) of them, up to the balancing of
step 3). Steps 3 and 4 take more examples as the fraction grows and never drop one, so the
subset of a smaller fraction lies inside that of a larger one at the same seed (nested
label-efficiency curves).
"""
from __future__ import annotations

import hashlib
import math
import numbers
from collections.abc import Sequence
from typing import Any

import numpy as np


def check_fraction(fraction: Any, name: str = 'fraction') -> float:
  """Returns `fraction` as a float in (0, 1]; fails naming `name` otherwise."""
  if (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real)
      or not 0 < fraction <= 1):
    raise ValueError(f'{name}={fraction!r}: set it to a number in (0, 1], the share of the '
                     'training examples to train on (1.0: all of them).')
  return float(fraction)


def _check_labels(labels: np.ndarray) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim not in (1, 2) or labels.shape[0] == 0:
    raise ValueError(f'labels of shape {labels.shape}: expected (N,) class ids or (N, L) 0/1 '
                     'multi-label rows, N > 0.')
  if not np.issubdtype(labels.dtype, np.integer) and not np.issubdtype(labels.dtype, np.bool_):
    raise ValueError(f'labels of dtype {labels.dtype}: expected integer class ids or 0/1.')
  if labels.ndim == 1 and labels.min() < 0:
    raise ValueError(f'labels hold a negative class id ({labels.min()}).')
  if labels.ndim == 2 and not np.isin(labels, (0, 1)).all():
    raise ValueError('multi-label labels (N, L) must be 0/1.')
  return labels.astype(np.int64)


def _covered(labels: np.ndarray, indices: np.ndarray) -> np.ndarray:
  """Which classes (multi-label: labels) the examples at `indices` have, as bools."""
  if labels.ndim == 1:
    return np.bincount(labels[indices], minlength=labels.max() + 1) > 0
  return labels[indices].any(axis=0)


def _strata_and_firsts(labels: np.ndarray, rank: np.ndarray
                       ) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """The stratum of every example (rule step 1), and (class, its first example) for step 4.

  Args:
    labels: checked labels, (N,) or (N, L).
    rank: the position of every example in the seed's permutation.

  Returns:
    (strata, firsts): firsts in class order (multi-label: labels rarest first).
  """
  first = lambda members: int(members[np.argmin(rank[members])])
  if labels.ndim == 1:
    return labels, [(int(c), first(np.flatnonzero(labels == c))) for c in np.unique(labels)]
  positives = labels.sum(axis=0)
  present = [int(j) for j in np.argsort(positives, kind='stable') if positives[j] > 0]
  strata = np.full(labels.shape[0], labels.shape[1])  # No positive label: the last stratum.
  for j in reversed(present):  # Rarest last, so each example ends in its rarest label's stratum.
    strata[labels[:, j] == 1] = j
  return strata, [(j, first(np.flatnonzero(labels[:, j] == 1))) for j in present]


def _apportionment(labels: np.ndarray, seed: int) -> tuple[np.ndarray, list[tuple[int, int]]]:
  """Every example in the order of rule step 3, and (class, first example) pairs of step 4."""
  perm = np.random.default_rng(seed).permutation(labels.shape[0])
  rank = np.empty_like(perm)
  rank[perm] = np.arange(perm.size)
  strata, firsts = _strata_and_firsts(labels, rank)
  in_order = strata[perm]
  # The r-th example of a stratum (in permutation order) is taken when r of it are.
  within = np.zeros(perm.size, np.int64)
  for s in np.unique(in_order):
    members = in_order == s
    within[members] = np.arange(members.sum())
  priority = np.bincount(strata)[in_order] / (within + 0.5)
  return perm[np.lexsort((in_order, within, -priority))], firsts


def stratified_subset(labels: Any, fraction: float, seed: int) -> np.ndarray:
  """The sorted indices of the class-stratified subset of `fraction` (module docstring rule).

  Args:
    labels: (N,) class ids (multi-class, ordinal), or (N, L) 0/1 multi-label rows.
    fraction: the share of examples to keep, in (0, 1].
    seed: the run's seed; the same seed gives the same subset, and the subset of a smaller
      fraction lies inside that of a larger one.

  Returns:
    int64 indices into `labels`, ascending.

  Raises:
    ValueError: for a fraction outside (0, 1], or labels of the wrong shape or values.
  """
  fraction = check_fraction(fraction)
  labels = _check_labels(labels)
  order, firsts = _apportionment(labels, seed)
  taken = list(order[:math.floor(fraction * order.size + 0.5)])
  covered = _covered(labels, np.asarray(taken, np.int64))
  for c, example in firsts:
    if not covered[c]:
      taken.append(example)
      covered |= _covered(labels, np.asarray([example]))
  return np.sort(np.asarray(taken, np.int64))


def class_counts(labels: Any, num_classes: int) -> list[int]:
  """Examples per class (multi-class, ordinal), or positives per label (multi-label)."""
  labels = _check_labels(labels)
  if labels.ndim == 2:
    return [int(x) for x in labels.sum(axis=0)]
  return [int(x) for x in np.bincount(labels, minlength=num_classes)]


class Subset(Sequence):
  """The examples of `source` at `indices`, in that order (a random-access view)."""

  def __init__(self, source: Sequence[dict], indices: np.ndarray, description: str):
    """Args: source; indices into it; description: what chose them, for the repr."""
    self._source = source
    self._indices = np.asarray(indices, np.int64)
    digest = hashlib.sha1(self._indices.tobytes()).hexdigest()[:12]
    self._repr = f'Subset({source!r}, {description}, len={len(self)}, indices={digest})'

  def __len__(self) -> int:
    return int(self._indices.size)

  def __getitem__(self, index: int) -> dict[str, Any]:
    if not 0 <= index < len(self):
      raise IndexError(f'Index {index} out of range for {self!r}.')
    return self._source[int(self._indices[index])]

  def __repr__(self) -> str:
    # Stable across runs (grain checks it when an iterator state is restored); the digest of
    # the indices makes a resume onto another selection fail instead of training on it.
    return self._repr
