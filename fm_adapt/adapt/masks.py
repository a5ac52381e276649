"""Parameter masks from path regexes, and splitting a tree into trainable / frozen parts.

A parameter tree is a plain nested dict. Paths are '/'-joined keys, e.g.
'encoder/block_3/mlp/fc1/kernel'. A regex matches a path when it matches the whole path
(``re.fullmatch``), so ``'head/.*'`` selects the head and nothing else.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

import flax.traverse_util

Tree = Mapping[str, Any]


def flatten(tree: Tree) -> dict[str, Any]:
  """Flattens a nested dict into {'a/b/c': leaf}."""
  return flax.traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten`."""
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def match_rules(tree: Tree, rules: Sequence[tuple[str, Any]], *, what: str = "rule",
                require_used: bool = True) -> dict[str, int]:
  """Assigns each leaf path the index of the first rule whose regex matches it.

  Args:
    tree: parameter tree.
    rules: sequence of (regex, value) pairs; the first full match wins.
    what: name of the rules in error messages.
    require_used: also fail when a rule matches no parameter.

  Returns:
    {path: rule index}.

  Raises:
    ValueError: if a path matches no rule (lists the unmatched paths), or a rule matches nothing
      (a selector that selects nothing is almost always a typo).
  """
  compiled = [(re.compile(pattern), pattern) for pattern, _ in rules]
  assignment, unmatched = {}, []
  for path in flatten(tree):
    index = next((i for i, (rx, _) in enumerate(compiled) if rx.fullmatch(path)), None)
    if index is None:
      unmatched.append(path)
    else:
      assignment[path] = index
  if unmatched:
    raise ValueError(
        f"{len(unmatched)} parameter(s) match no {what}; add a rule such as ('.*', None) to "
        f"freeze the rest. Unmatched: {unmatched}")
  used = set(assignment.values())
  unused = [compiled[i][1] for i in range(len(compiled)) if i not in used]
  if unused and require_used:
    raise ValueError(f"{what}(s) {unused} match no parameter. Parameter paths look like: "
                     f"{list(flatten(tree))[:8]}")
  return assignment


def make_mask(tree: Tree, patterns: str | Sequence[str]) -> dict[str, Any]:
  """Returns a same-shaped tree of bools: True where the path fully matches any pattern."""
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  compiled = [re.compile(p) for p in patterns]
  flat = {k: any(rx.fullmatch(k) for rx in compiled) for k in flatten(tree)}
  if patterns and not any(flat.values()):
    raise ValueError(f"Patterns {patterns} match no parameter. Paths look like: {list(flat)[:8]}")
  return unflatten(flat)


def split(tree: Tree, mask: Tree) -> tuple[dict[str, Any], dict[str, Any]]:
  """Splits a tree into (selected, rest) by a bool mask; each holds only its own leaves."""
  flat_mask = flatten(mask)
  selected, rest = {}, {}
  for path, leaf in flatten(tree).items():
    (selected if flat_mask[path] else rest)[path] = leaf
  return unflatten(selected), unflatten(rest)


def merge(*trees: Tree) -> dict[str, Any]:
  """Merges trees with disjoint leaves into one tree (inverse of `split`)."""
  flat: dict[str, Any] = {}
  for tree in trees:
    for path, leaf in flatten(tree).items():
      if path in flat:
        raise ValueError(f"Leaf {path!r} appears in more than one tree.")
      flat[path] = leaf
  return unflatten(flat)


def count_by_module(trainable: Tree, frozen: Tree, depth: int = 1) -> list[tuple[str, int, int]]:
  """Counts trainable / frozen parameters per module prefix of `depth` path components.

  Returns:
    Rows (module, trainable count, frozen count) in natural order of the module names
    ('block_2' before 'block_10'), plus a 'total' row.
  """
  counts: dict[str, list[int]] = {}
  for column, tree in enumerate((trainable, frozen)):
    for path, leaf in flatten(tree).items():
      module = "/".join(path.split("/")[:depth])
      counts.setdefault(module, [0, 0])[column] += int(getattr(leaf, "size", 1))
  natural = lambda name: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]
  rows = [(m, counts[m][0], counts[m][1]) for m in sorted(counts, key=natural)]
  rows.append(("total", sum(r[1] for r in rows), sum(r[2] for r in rows)))
  return rows
