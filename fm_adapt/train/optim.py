"""Optimizers from the config: regex schedules, frozen parameters without optimizer state.

`config.schedule` is either one schedule dict (every parameter trains with it) or a list of
`(regex, schedule_or_None)` rules over '/'-joined parameter paths; the first full match wins,
every parameter must match a rule, and `None` freezes. Frozen parameters are split out of the
trainable tree before the optimizer sees them, so they carry no optimizer state and no gradient
is ever computed for them (big_vision `optax.py` idea; see DESIGN.md).

Schedule dict keys: `decay_type` ('constant' | 'cosine' | 'linear' | 'piecewise'),
`warmup_steps` or `warmup_percent`, `boundaries` (fractions of the total steps, piecewise),
`scale` (multiplier applied at each boundary), `end_mult` (cosine / linear end as a fraction of
the peak), `lr_mult` (multiplier on `config.lr` for this group).
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import optax

from fm_adapt import config as config_lib
from fm_adapt import param_paths

SCHEDULE_KEYS = ("decay_type", "warmup_steps", "warmup_percent", "boundaries", "scale",
                 "end_mult", "lr_mult")
DECAY_TYPES = ("constant", "cosine", "linear", "piecewise")


def _checked(sched: Mapping[str, Any]) -> dict[str, Any]:
  sched = config_lib.check_known_keys(sched, SCHEDULE_KEYS, "a schedule")
  decay = sched.get("decay_type", "constant")
  if decay not in DECAY_TYPES:
    raise ValueError(f"Unknown decay_type {decay!r}; valid: {list(DECAY_TYPES)}")
  return sched


def make_schedule(sched: Mapping[str, Any], base_lr: float, total_steps: int) -> optax.Schedule:
  """Builds a learning-rate schedule (a function of the step) from a schedule dict."""
  sched = _checked(sched)
  peak = base_lr * float(sched.get("lr_mult", 1.0))
  warmup = int(sched.get("warmup_steps", round(sched.get("warmup_percent", 0.0) * total_steps)))
  decay_steps = max(total_steps - warmup, 1)
  decay = sched.get("decay_type", "constant")
  end = peak * float(sched.get("end_mult", 0.0))
  if decay == "constant":
    main = optax.constant_schedule(peak)
  elif decay == "cosine":
    main = optax.cosine_decay_schedule(peak, decay_steps, alpha=float(sched.get("end_mult", 0.0)))
  elif decay == "linear":
    main = optax.linear_schedule(peak, end, decay_steps)
  else:
    scale = float(sched.get("scale", 0.1))
    bounds = {int(round(f * total_steps)) - warmup: scale for f in sched.get("boundaries", ())}
    main = optax.piecewise_constant_schedule(peak, bounds)
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), main], [warmup])


def normalize_rules(schedule: Any) -> list[tuple[str, dict[str, Any] | None]]:
  """Turns `config.schedule` into a list of (regex, schedule dict or None) rules."""
  if schedule is None:
    schedule = {}
  if hasattr(schedule, "to_dict"):  # ml_collections.ConfigDict is not a Mapping.
    schedule = schedule.to_dict()
  if isinstance(schedule, Mapping):
    return [(".*", dict(schedule))]
  rules = []
  for pattern, sched in param_paths.rule_pairs(schedule, "Schedule rule (regex, schedule_or_None)"):
    sched = sched.to_dict() if hasattr(sched, "to_dict") else sched
    rules.append((pattern, None if sched is None else dict(sched)))
  return rules


def trainable_mask(params: Mapping[str, Any], schedule: Any) -> dict[str, Any]:
  """Bool tree: True for parameters whose schedule rule is not None."""
  rules = normalize_rules(schedule)
  assignment = param_paths.match_rules(params, rules, what="schedule rule")
  return param_paths.unflatten({p: rules[i][1] is not None for p, i in assignment.items()})


# config.optax_name -> the direction-finding part of the optimizer, taking `config.optax` as
# kwargs; learning rate, weight decay and clipping are chained around it by `make_optimizer`.
OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "adam": optax.scale_by_adam,
    "adamw": optax.scale_by_adam,
    "sgd": optax.identity,
    "momentum": lambda **kw: optax.trace(decay=kw.pop("momentum", 0.9), **kw),
    "lion": optax.scale_by_lion,
}


def _base_transform(name: str, kwargs: Mapping[str, Any]) -> optax.GradientTransformation:
  if name not in OPTIMIZERS:
    raise ValueError(f"Unknown optax_name {name!r}; valid: {sorted(OPTIMIZERS)}")
  return OPTIMIZERS[name](**dict(kwargs))


def make_optimizer(config: Any, trainable_params: Mapping[str, Any], total_steps: int,
                   schedule: Any = None
                   ) -> tuple[optax.GradientTransformation, dict[int, optax.Schedule]]:
  """Builds the optimizer for the trainable tree only.

  Args:
    config: run config with `optax_name`, `optax` (kwargs), `lr`, `wd`, `grad_clip_norm`,
      `schedule`.
    trainable_params: the trainable subtree (frozen leaves already removed).
    total_steps: total number of training steps (schedules are fractions of it).
    schedule: the schedule rules to use instead of `config.schedule` (e.g. adaptation's).

  Returns:
    (optimizer, {group index: schedule}) — schedules are returned for logging.
  """
  rules = normalize_rules(config.get("schedule") if schedule is None else schedule)
  assignment = param_paths.match_rules(trainable_params, rules, what="schedule rule",
                                 require_used=False)
  if any(rules[i][1] is None for i in assignment.values()):
    raise ValueError("make_optimizer got frozen parameters; split them out first.")
  groups = sorted(set(assignment.values()))
  schedules = {g: make_schedule(rules[g][1], config.lr, total_steps) for g in groups}
  labels = param_paths.unflatten(assignment)
  steps = []
  if config.get("grad_clip_norm"):
    steps.append(optax.clip_by_global_norm(config.grad_clip_norm))
  steps.append(_base_transform(config.get("optax_name", "adam"), config.get("optax", {}) or {}))
  if config.get("wd"):
    # Decoupled weight decay on kernels only (not biases, norms, embeddings of tokens).
    decay_mask = param_paths.unflatten({p: p.endswith("kernel") for p in param_paths.flatten(trainable_params)})
    steps.append(optax.add_decayed_weights(config.wd, mask=decay_mask))
  steps.append(optax.multi_transform(
      {g: optax.scale_by_learning_rate(s) for g, s in schedules.items()}, labels))
  return optax.chain(*steps), schedules
