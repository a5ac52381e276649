"""Start a run from a pretrained checkpoint: load it and overlay it onto the init.

`config.model_init` names the file (a local path, a URI such as `gs://bucket/w.npz`, or a path
relative to $FM_ADAPT_WEIGHTS_DIR: `fm_adapt.weights.locate` finds and hashes it);
`config.model_load = dict(name=..., dont_load=[regex, ...])` picks the importer by name
(`fm_adapt.weights.LOADERS`, detected from the keys when absent) and the parameters that keep
their fresh initialization (e.g. a new head); each dont_load regex must match a variable of the
model. Parameters that adaptation transforms add (LoRA factors, prompts, adapters) are not in the
checkpoint and keep their initialization too.

A catalogue model (`config.model_init = 'zoo:NAME:PATH'`, `fm_adapt.weights.zoo`) loads with its
entry's layout (`zoo.load_params`); the entry's own dont_load (RETFound: a fresh `fc_norm`) and
the new head keep their initialization, and the import report (every key loaded, ignored,
dropped or kept) is printed.
"""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from etils import epath
import numpy as np

from fm_adapt import weights
from fm_adapt import config as config_lib
from fm_adapt import param_paths
from fm_adapt.train import writer

LOAD_KEYS = ("name", "dont_load")


def _loaded_variables(path: epath.Path, name: str | None, dont_load: Sequence[str],
                      base_params: Mapping[str, Any],
                      entry: weights.zoo.Entry | None = None) -> dict[str, Any]:
  if entry is not None:
    params, report = weights.zoo.load_params(entry, path, base_params, dont_load)
    writer.console(f"Catalogue model {entry.name!r} ({entry.title}): {report.summary()}")
    return {"params": params}
  name = name or weights.detect_name(path)
  if name not in weights.LOADERS:
    raise ValueError(f"Unknown config.model_load.name {name!r}; valid: {sorted(weights.LOADERS)}")
  if name in ("efficientnet_lite0", "fm_adapt"):  # These return full variables.
    return weights.load(name, path)
  return {"params": weights.load(name, path, target_params=base_params, dont_load=list(dont_load))}


def check_load_config(load_cfg: Mapping[str, Any], variables: Mapping[str, Any]) -> dict[str, Any]:
  """Checks `config.model_load` against the model's variables; returns it as a dict.

  Raises:
    ValueError: for the old word 'kind' (now 'name'), unknown keys, or a dont_load regex that
      matches no variable path of the model (naming it and the closest paths).
  """
  load_cfg = dict(load_cfg)
  if "kind" in load_cfg:
    raise ValueError(f"config.model_load says which importer with 'name' (the word is now 'name', "
                     f"not 'kind'): write model_load.name={load_cfg['kind']!r}.")
  load_cfg = config_lib.check_known_keys(load_cfg, LOAD_KEYS, "config.model_load")
  dont_load = load_cfg.get("dont_load", ())
  dont_load = [dont_load] if isinstance(dont_load, str) else list(dont_load)
  paths = {p.split("/", 1)[1] for p in param_paths.flatten(variables)}  # Without the collection.
  param_paths.check_patterns_match(dont_load, paths, what="config.model_load.dont_load regex")
  return dict(load_cfg, dont_load=dont_load)


def overlay(init: Mapping[str, Any], loaded: Mapping[str, Any], keep: Sequence[str],
            where: str) -> dict[str, Any]:
  """Takes every leaf of `init` from `loaded`, except paths matching a `keep` regex.

  Only the shapes and dtypes of `init` are read: its leaves may be arrays sharded across
  processes. Kept leaves are returned as they are (the same objects); the others are numpy
  arrays in the init's dtype.

  Raises:
    ValueError: listing leaves missing from `loaded`, leaves of `loaded` the model lacks, and
      shape differences (path and both shapes).
  """
  flat_init, flat_loaded = param_paths.flatten(init), param_paths.flatten(loaded)
  kept = {p for p in flat_init if any(re.fullmatch(rx, p) for rx in keep)}
  missing = sorted(set(flat_init) - set(flat_loaded) - kept)
  unexpected = sorted(p for p in set(flat_loaded) - set(flat_init)
                      if not any(re.fullmatch(rx, p) for rx in keep))
  shapes = sorted(f"{p}: checkpoint {np.shape(flat_loaded[p])} vs model {np.shape(flat_init[p])}"
                  for p in set(flat_init) & set(flat_loaded) - kept
                  if np.shape(flat_loaded[p]) != np.shape(flat_init[p]))
  if missing or unexpected or shapes:
    raise ValueError(
        f"The pretrained checkpoint {where} does not fit the model. Missing: {missing[:20]}; "
        f"unexpected: {unexpected[:20]}; shape differences: {shapes[:20]}. Use "
        "config.model_load.dont_load=['head/.*'] for a new head, or the matching model variant.")
  out = {p: (flat_init[p] if p in kept else np.asarray(flat_loaded[p], flat_init[p].dtype))
         for p in flat_init}
  return param_paths.unflatten(out)


def check_catalogue_load(entry: weights.zoo.Entry, load_cfg: Mapping[str, Any]) -> None:
  """A catalogue model loads with its entry's layout: a different model_load.name is refused."""
  name = dict(load_cfg).get("name")
  if name not in (None, entry.layout):
    raise ValueError(
        f"config.model_load.name={name!r}, but the catalogue model {entry.name!r} is read with "
        f"its own layout {entry.layout!r}: leave model_load.name out (or set it to "
        f"{entry.layout!r}), or give config.model_init as a plain path to use another loader.")


def load_pretrained(variables: Mapping[str, Any], path: epath.PathLike,
                    load_cfg: Mapping[str, Any], extra_paths: Sequence[str],
                    entry: weights.zoo.Entry | None = None) -> dict[str, Any]:
  """Overlays a pretrained checkpoint onto freshly initialized variables.

  Args:
    variables: the initialized variables ({'params': ..., maybe 'batch_stats': ...}): numpy
      or jax arrays, possibly sharded across processes (only shapes and dtypes are read; the
      leaves kept, dont_load and `extra_paths`, come back as the same objects).
    path: the checkpoint file.
    load_cfg: dict(name=..., dont_load=[...]) (`check_load_config`).
    extra_paths: '/'-joined params paths added by adaptation transforms (kept as initialized).
    entry: the catalogue model the file is (`config.model_init = 'zoo:...'`), or None. Its
      layout reads the file; its own dont_load and the new head ('head/.*', a catalogue file is
      an encoder) keep their initialization; the import report is printed.
  """
  load_cfg = check_load_config(load_cfg, variables)
  dont_load = load_cfg["dont_load"]
  if entry is not None:
    check_catalogue_load(entry, load_cfg)
    new_head = ["head/.*"] if "head" in variables["params"] else []
    dont_load = list(dict.fromkeys([*dont_load, *entry.dont_load, *new_head]))
  extras = set(extra_paths)
  base_params = param_paths.unflatten({p: v for p, v in param_paths.flatten(variables["params"]).items()
                                 if p not in extras})
  loaded = _loaded_variables(epath.Path(path), load_cfg.get("name"), dont_load, base_params,
                             entry)
  # dont_load applies in every collection (params, batch_stats); extras are params only.
  keep = [f"[^/]+/(?:{rx})" for rx in dont_load] + [f"params/{re.escape(p)}" for p in extras]
  return overlay(dict(variables), loaded, keep, str(path))
