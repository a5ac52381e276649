"""Tests of parameter masks and tree splitting."""
import numpy as np
import pytest

from fm_adapt import param_paths

TREE = {"encoder": {"block_0": {"mlp": {"fc1": {"kernel": np.ones((2, 3)), "bias": np.ones(3)}}}},
        "head": {"kernel": np.ones((3, 2)), "bias": np.zeros(2)}}


def test_make_mask_full_match():
  mask = param_paths.flatten(param_paths.make_mask(TREE, "head/.*"))
  assert mask == {"encoder/block_0/mlp/fc1/kernel": False, "encoder/block_0/mlp/fc1/bias": False,
                  "head/kernel": True, "head/bias": True}
  # 'head' alone does not fullmatch 'head/kernel': a selector that matches nothing is an error.
  with pytest.raises(ValueError, match="matches no parameter"):
    param_paths.make_mask(TREE, "head")


def test_make_mask_every_pattern_must_match():
  """A typo in one of several patterns is an error naming it and the closest paths."""
  with pytest.raises(ValueError, match=r"LoRA target '.\*fc2/kernel' matches no parameter.*"
                                       r"Closest paths: \['encoder/block_0/mlp/fc1/kernel'"):
    param_paths.make_mask(TREE, ["head/kernel", ".*fc2/kernel"], what="LoRA target")
  mask = param_paths.flatten(param_paths.make_mask(TREE, ["head/kernel", ".*fc1/kernel"]))
  assert [p for p, m in mask.items() if m] == ["encoder/block_0/mlp/fc1/kernel", "head/kernel"]


def test_closest_paths():
  paths = ["encoder/block_0/attn/query/kernel", "encoder/block_0/attn/value/kernel", "head/bias"]
  assert param_paths.closest_paths(".*atn/value/kernel", paths, n=1) == [
      "encoder/block_0/attn/value/kernel"]


def test_split_merge_roundtrip():
  selected, rest = param_paths.split(TREE, param_paths.make_mask(TREE, ".*bias"))
  assert set(param_paths.flatten(selected)) == {"encoder/block_0/mlp/fc1/bias", "head/bias"}
  merged = param_paths.flatten(param_paths.merge(selected, rest))
  assert merged.keys() == param_paths.flatten(TREE).keys()
  with pytest.raises(ValueError, match="more than one"):
    param_paths.merge(selected, selected)


def test_match_rules_lists_unmatched_paths():
  with pytest.raises(ValueError, match=r"encoder/block_0/mlp/fc1/kernel"):
    param_paths.match_rules(TREE, [("head/.*", 1), (".*bias", 2)])
  with pytest.raises(ValueError, match=r"\['nothing/.*'\] match no parameter.*Closest paths"):
    param_paths.match_rules(TREE, [(".*", 1), ("nothing/.*", 2)])
  assert param_paths.match_rules(TREE, [("head/.*", 0), (".*", 1)])["head/bias"] == 0


def test_count_by_module():
  selected, rest = param_paths.split(TREE, param_paths.make_mask(TREE, "head/.*"))
  rows = param_paths.count_by_module(selected, rest)
  assert rows == [("encoder", 0, 9), ("head", 8, 0), ("total", 8, 9)]


def test_count_by_module_in_natural_order():
  tree = {"block_10": {"k": np.zeros(3)}, "block_2": {"k": np.zeros(2)}, "head": np.zeros(1)}
  rows = param_paths.count_by_module(tree, {})
  assert [r[0] for r in rows] == ["block_2", "block_10", "head", "total"]
