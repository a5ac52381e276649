"""Parameter paths: flattening, regex selectors and rules, masks, trainable / frozen splits.

A parameter tree is a plain nested dict. Paths are '/'-joined keys, e.g.
'encoder/block_3/mlp/fc1/kernel'. A regex matches a path when it matches the whole path
(``re.fullmatch``), so ``'head/.*'`` selects the head and nothing else. Every selector a user
writes must select something: `check_patterns_match` and `match_rules` fail naming the regex and
the closest paths. Used alike by the adaptation transforms, the optimizer's schedule rules,
sharding rules, checkpoint import (`dont_load`) and checkpoints.
"""
from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.traverse_util

Tree = Mapping[str, Any]


def flatten(tree: Tree) -> dict[str, Any]:
  """Flattens a nested dict into {'a/b/c': leaf}."""
  return flax.traverse_util.flatten_dict(dict(tree), sep="/")


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten`."""
  return flax.traverse_util.unflatten_dict(dict(flat), sep="/")


def closest_paths(pattern: str, paths: Iterable[str], n: int = 5) -> list[str]:
  """The `n` paths most similar to a pattern, to suggest what a typo meant.

  Similarity is difflib's: the number of characters in matching blocks (so a long path that
  shares most of the pattern beats a short one that shares little), then its ratio. Regex
  syntax is left out of the comparison.
  """
  text = re.sub(r"[.*+?^$\\()\[\]{}|]", "", pattern)

  def score(path: str) -> tuple[int, float]:
    matcher = difflib.SequenceMatcher(None, text, path, autojunk=False)
    return sum(block.size for block in matcher.get_matching_blocks()), matcher.ratio()

  return sorted(paths, key=score, reverse=True)[:n]


def check_patterns_match(patterns: Sequence[str], paths: Iterable[str], *,
                         what: str = "pattern") -> None:
  """Fails unless every regex fully matches at least one of `paths`.

  Args:
    patterns: regexes (full match).
    paths: the '/'-joined paths they select from.
    what: name of the patterns in the message, e.g. "LoRA target".

  Raises:
    ValueError: naming the first pattern that matches nothing and the paths closest to it.
  """
  paths = list(paths)
  for pattern in patterns:
    rx = re.compile(pattern)
    if not any(rx.fullmatch(path) for path in paths):
      raise ValueError(f"{what} {pattern!r} matches no parameter (patterns match whole paths). "
                       f"Closest paths: {closest_paths(pattern, paths)}")


def rule_pairs(rules: Any, what: str) -> list[tuple[str, Any]]:
  """Checks that `rules` is a sequence of (regex, value) pairs and returns them as tuples.

  Raises:
    ValueError: naming `what` and the first entry that is not a (str, value) pair or whose regex
      does not compile.
  """
  if isinstance(rules, (str, Mapping)) or not isinstance(rules, Sequence):
    raise ValueError(f"{what}s are a list of (regex, value) pairs, got {rules!r}")
  pairs = []
  for rule in rules:
    if not (isinstance(rule, Sequence) and not isinstance(rule, str) and len(rule) == 2
            and isinstance(rule[0], str)):
      raise ValueError(f"{what}s are (regex, value) pairs, got {rule!r}")
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ValueError(f"{what} regex {rule[0]!r} does not compile: {e}") from e
    pairs.append((rule[0], rule[1]))
  return pairs


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
    closest = {p: closest_paths(p, assignment, n=3) for p in unused}
    raise ValueError(f"{what}(s) {unused} match no parameter (an earlier rule may take its "
                     f"paths). Closest paths: {closest}")
  return assignment


def make_mask(tree: Tree, patterns: str | Sequence[str], *, what: str = "pattern"
              ) -> dict[str, Any]:
  """Returns a same-shaped tree of bools: True where the path fully matches any pattern.

  Raises:
    ValueError: if any one pattern matches no path (naming it and the closest paths): in a
      list of selectors, one with a typo must not be silently ignored.
  """
  patterns = [patterns] if isinstance(patterns, str) else list(patterns)
  paths = list(flatten(tree))
  check_patterns_match(patterns, paths, what=what)
  compiled = [re.compile(p) for p in patterns]
  return unflatten({k: any(rx.fullmatch(k) for rx in compiled) for k in paths})


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
