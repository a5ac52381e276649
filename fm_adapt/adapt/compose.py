"""Composing adaptation transforms from `config.adapt`, and schedules that freeze the rest.

  config.model_name = 'vit'
  config.adapt = [dict(name='lora', rank=8, alpha=16, targets='.*attn/(query|value)/kernel'),
                  dict(name='vpt', mode='deep', num_tokens=10)]
  adaptation = compose.apply_transforms(config.adapt, config.model_name, config.model)
  model = models.get_model(config.model_name, num_classes=..., **config.model)
  params = adaptation.init_extra(model.init(rng, images)['params'], extra_rng)
  apply_fn = adaptation.wrap_apply(state.make_apply_fn(model))
  config.schedule = compose.schedule_for(adaptation, dict(decay_type='cosine'))
  export = adaptation.merge(params)          # LoRA folded into W; prompts / adapters kept

Every transform is a pure pytree transform attached from outside the model: `init_extra` adds
its parameters (made from the base parameters), `wrap_apply` takes them out again and applies
them by intercepting module calls (`flax.linen.intercept_methods`). Models know nothing of
adaptation. Transforms (the registry TRANSFORMS; each at most once; `name` says which) and
what they make trainable:

  lora     rank, targets (regex or list; each must match), alpha=None (= rank), rslora=False,
           dora=False  -> a `lora/` subtree (`fm_adapt.adapt.lora`)                   'lora/.*'
  vpt      mode ('shallow' | 'deep'), num_tokens, dropout=0.0 -> `prompt/`           'prompt/.*'
  ept      num_tokens (embedded prompt tuning)                 -> `prompt/`           'prompt/.*'
  adapter  mode ('sequential' | 'parallel'), dim | reduction, where, blocks, scale, act
           -> `.../adapter...` subtrees at the model family's sites
              (`fm_adapt.adapt.adapters.PLACEMENTS`)                                '.*adapter.*'
  bitfit   (no options)                                                                '.*bias'

plus 'head/.*' unless `train_head=False`. Linear probing, BitFit, partial and LayerNorm-only
fine-tuning need no transform at all: they are schedules (`SCHEDULE_PRESETS`).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax

from fm_adapt.adapt import adapters, lora, prompts
from fm_adapt import param_paths

Params = dict[str, Any]
Shape = tuple[int, ...]
Rule = tuple[str, Any]
ApplyFn = Callable[..., Any]

HEAD_PATTERN = 'head/.*'
NAME_KEY = 'name'


@dataclasses.dataclass(frozen=True)
class Part:
  """What one transform contributes.

  Attributes:
    patterns: regexes of the parameters it makes trainable.
    init: `init(base_params, rng, image_shape) -> tree` of its own parameters (disjoint from
      the base), or None when it adds none.
    wrap: wraps a `state.make_apply_fn`-style apply function, or None.
    merge: `merge(params) -> params` folding it into the base parameters for export, or None.
  """
  patterns: tuple[str, ...]
  init: Callable[[Params, jax.Array], Params] | None = None
  wrap: Callable[[ApplyFn], ApplyFn] | None = None
  merge: Callable[[Params], Params] | None = None


@dataclasses.dataclass(frozen=True)
class Adaptation:
  """What a list of transforms does to a model.

  Attributes:
    model_kwargs: the model's kwargs, unchanged (transforms add no model fields).
    init_extra: `init_extra(params, rng, image_shape=None) -> params`, adding the transforms'
      own parameters (each made from the base parameters) to an initialized (or `eval_shape`d)
      tree; `image_shape` (H, W, C) of the images run sizes what depends on the token count
      (EPT), else the stored position-embedding grid does.
    wrap_apply: wraps a `state.make_apply_fn`-style apply function (applies the transforms).
    trainable_patterns: regexes of the parameters the transforms make trainable.
    merge: `merge(params) -> params` for export (folds LoRA into the kernels).
    transforms: the checked transform configs, in order.
  """
  model_kwargs: dict[str, Any]
  init_extra: Callable[..., Params]
  wrap_apply: Callable[[ApplyFn], ApplyFn]
  trainable_patterns: list[str]
  merge: Callable[[Params], Params]
  transforms: tuple[dict[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Transform:
  """One registry entry: its valid and required keys, and `build(cfg, model_name) -> Part`."""
  keys: tuple[str, ...]
  required: tuple[str, ...]
  build: Callable[[dict[str, Any], str], Part]


def _targets(cfg: Mapping[str, Any]) -> list[str]:
  targets = cfg['targets']
  return [targets] if isinstance(targets, str) else list(targets)


def _lora(cfg: dict[str, Any], model_name: str) -> Part:
  del model_name  # LoRA works on any model's Dense / 1x1 Conv kernels.
  targets = _targets(cfg)
  if not targets:
    raise ValueError("lora needs non-empty 'targets' (kernel path regexes).")
  scale = lora.scaling(cfg['rank'], cfg.get('alpha'), rslora=cfg.get('rslora', False))

  def init(params: Params, rng: jax.Array, image_shape: Shape | None = None) -> Params:
    del image_shape  # LoRA factors follow the kernels' shapes.
    if lora.LORA_KEY in params:
      raise ValueError(f"params already hold a {lora.LORA_KEY!r} subtree.")
    mask = param_paths.make_mask(params, targets, what='LoRA target')
    selected = [p for p, m in param_paths.flatten(mask).items() if m]
    logging.info('LoRA rank %d on %d kernels: %s', cfg['rank'], len(selected), selected)
    return {lora.LORA_KEY: lora.init(params, mask, cfg['rank'], rng,
                                     dora=cfg.get('dora', False))}

  return Part(('lora/.*',), init, lambda fn: lora.wrap_apply_fn(fn, scale=scale),
              lambda params: lora.merge(params, params[lora.LORA_KEY], scale=scale))


def _prompt_part(prompt: dict[str, Any]) -> Part:
  prompt = prompts.check_config(prompt)
  return Part(('prompt/.*',),
              lambda params, rng, image_shape=None: {prompts.PROMPT_KEY: prompts.init(
                  params, prompt, rng, image_shape=image_shape)},
              lambda fn: prompts.wrap_apply_fn(fn, prompt))


def _vpt(cfg: dict[str, Any], model_name: str) -> Part:
  del model_name  # Any model with the ViT layout (see fm_adapt.adapt.prompts).
  modes = ('shallow', 'deep')
  if cfg['mode'] not in modes:
    raise ValueError(f"Unknown vpt mode {cfg['mode']!r}; valid: {list(modes)}.")
  return _prompt_part(dict(kind=f"vpt_{cfg['mode']}", num_tokens=cfg['num_tokens'],
                           dropout=cfg.get('dropout', 0.0)))


def _ept(cfg: dict[str, Any], model_name: str) -> Part:
  del model_name
  return _prompt_part(dict(kind='ept', num_tokens=cfg['num_tokens']))


def _adapter(cfg: dict[str, Any], model_name: str) -> Part:
  checked = adapters.check_config({k: v for k, v in cfg.items() if k != NAME_KEY}, model_name)
  return Part(('.*adapter.*',),
              lambda params, rng, image_shape=None: adapters.init(params, checked, model_name,
                                                                  rng),
              lambda fn: adapters.wrap_apply_fn(fn, checked, model_name))


def _bitfit(cfg: dict[str, Any], model_name: str) -> Part:
  del cfg, model_name
  return Part(('.*bias',))


TRANSFORMS: dict[str, Transform] = {
    'lora': Transform(('name', 'rank', 'targets', 'alpha', 'rslora', 'dora'),
                      ('rank', 'targets'), _lora),
    'vpt': Transform(('name', 'mode', 'num_tokens', 'dropout'), ('mode', 'num_tokens'), _vpt),
    'ept': Transform(('name', 'num_tokens'), ('num_tokens',), _ept),
    'adapter': Transform(('name', *adapters.KEYS), (), _adapter),
    'bitfit': Transform(('name',), (), _bitfit),
}
# Transforms that both write the same subtree.
_EXCLUSIVE = ({'vpt', 'ept'},)


def check_transform(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Checks one transform config's name and keys against TRANSFORMS.

  Raises:
    ValueError: for the old word 'kind', an unknown name (listing valid names), unknown keys or
      missing keys (listing the valid keys of that transform).
  """
  cfg = dict(cfg)
  if 'kind' in cfg:
    raise ValueError(f"config.adapt entries say which transform with 'name' (the word is now "
                     f"'name', not 'kind'): write dict(name={cfg['kind']!r}, ...); got {cfg}.")
  name = cfg.get(NAME_KEY)
  if name not in TRANSFORMS:
    raise ValueError(f'Unknown adaptation name {name!r}; valid names: {sorted(TRANSFORMS)}.')
  spec = TRANSFORMS[name]
  unknown = sorted(set(cfg) - set(spec.keys))
  missing = [k for k in spec.required if k not in cfg]
  if unknown or missing:
    what = f'unknown keys {unknown}' if unknown else f'missing keys {missing}'
    raise ValueError(f'Adaptation {name!r}: {what}; valid keys: {list(spec.keys)}, '
                     f'required: {list(spec.required)}.')
  return cfg


def _checked(adapt_cfgs: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]]:
  checked = []
  for cfg in adapt_cfgs or ():
    cfg = check_transform(cfg)
    if any(c[NAME_KEY] == cfg[NAME_KEY] for c in checked):
      raise ValueError(f"Adaptation {cfg[NAME_KEY]!r} given twice; combine them into one.")
    clash = next((c for c in checked for group in _EXCLUSIVE
                  if {c[NAME_KEY], cfg[NAME_KEY]} <= group), None)
    if clash is not None:
      raise ValueError(f"Adaptations {clash[NAME_KEY]!r} and {cfg[NAME_KEY]!r} both make the "
                       "prompt; choose one.")
    checked.append(cfg)
  return checked


def _make_init_extra(parts: Sequence[Part]) -> Callable[..., Params]:
  def init_extra(params: Params, rng: jax.Array, image_shape: Shape | None = None) -> Params:
    with_init = [p for p in parts if p.init is not None]
    keys = jax.random.split(rng, max(len(with_init), 1))
    # Each transform sees the base parameters only (a LoRA target never selects an adapter).
    return param_paths.merge(params, *(p.init(params, key, image_shape)
                                       for p, key in zip(with_init, keys)))
  return init_extra


def _make_wrap(parts: Sequence[Part]) -> Callable[[ApplyFn], ApplyFn]:
  def wrap(apply_fn: ApplyFn) -> ApplyFn:
    for part in parts:
      apply_fn = part.wrap(apply_fn) if part.wrap is not None else apply_fn
    return apply_fn
  return wrap


def _make_merge(parts: Sequence[Part]) -> Callable[[Params], Params]:
  def merge(params: Params) -> Params:
    params = dict(params)
    for part in parts:
      params = part.merge(params) if part.merge is not None else params
    return params
  return merge


def apply_transforms(adapt_cfgs: Sequence[Mapping[str, Any]] | None, model_name: str,
                     model_kwargs: Mapping[str, Any] | None = None, *,
                     train_head: bool = True) -> Adaptation:
  """Builds the `Adaptation` of a list of transform configs (`config.adapt`).

  Args:
    adapt_cfgs: transform dicts, each with a 'name' in TRANSFORMS (None or [] adapts nothing).
    model_name: the model's name in `fm_adapt.models.MODELS` ('vit', 'resnet', 'efficientnet').
    model_kwargs: the model's configuration (`config.model`); not modified.
    train_head: add 'head/.*' to the trainable patterns.

  Returns:
    The Adaptation.

  Raises:
    ValueError: for unknown names or keys, the old word 'kind', a transform given twice, or
      options the model family does not support.
  """
  checked = _checked(adapt_cfgs)
  parts = [TRANSFORMS[cfg[NAME_KEY]].build(cfg, model_name) for cfg in checked]
  patterns = []
  for part in parts:
    patterns += [p for p in part.patterns if p not in patterns]
  if train_head and HEAD_PATTERN not in patterns:
    patterns.append(HEAD_PATTERN)
  return Adaptation(model_kwargs=dict(model_kwargs or {}), init_extra=_make_init_extra(parts),
                    wrap_apply=_make_wrap(parts), trainable_patterns=patterns,
                    merge=_make_merge(parts), transforms=tuple(checked))


def union(patterns: Sequence[str]) -> str:
  """One regex matching what any of `patterns` fully matches."""
  if not patterns:
    raise ValueError('union() of no patterns.')
  for p in patterns:
    re.compile(p)
  return '|'.join(f'(?:{p})' for p in patterns)


def _checked_rules(rules: Sequence[Any]) -> list[Rule]:
  out = []
  for rule in rules:
    if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
      raise ValueError(f'Schedule rules are (regex, schedule_or_None) pairs, got {rule!r}.')
    out.append((rule[0], None if rule[1] is None else dict(rule[1])))
  return out


def schedule_for(adaptation: Adaptation, sched: Mapping[str, Any] | Sequence[Rule] | None = None,
                 *, default: Mapping[str, Any] | None = None) -> list[Rule]:
  """The `config.schedule` rules that train what `adaptation` makes trainable, freezing the rest.

  Args:
    adaptation: from `apply_transforms`.
    sched: either a schedule dict (or None for {}) used by every trainable parameter, or the
      user's own list of (regex, schedule_or_None) rules. User rules come first and so win: a
      None freezes even what a transform would train, a dict trains more (e.g.
      ('encoder/norm/.*', {})) with its own schedule. A final catch-all ('.*', x) of the user stays
      last.
    default: with a rule list, the schedule of the transforms' parameters ({} if None).

  Returns:
    Rules [(user rules...), (union of the trainable patterns, schedule), ('.*', None)].
  """
  if sched is None or isinstance(sched, Mapping) or hasattr(sched, 'keys'):  # ConfigDict too.
    own, user, tail = dict(sched or {}), [], ('.*', None)
  else:
    user, own = _checked_rules(sched), dict(default or {})
    tail = user.pop() if user and user[-1][0] == '.*' else ('.*', None)
  if not adaptation.trainable_patterns:
    return [*user, tail]
  return [*user, (union(adaptation.trainable_patterns), own), tail]


def _last_k_regex(k: int, depth: int) -> str:
  if not 0 < k <= depth:
    raise ValueError(f'last_k needs 0 < k <= depth, got k={k}, depth={depth}.')
  blocks = '|'.join(str(i) for i in range(depth - k, depth))
  return f'encoder/block_({blocks})/.*'


NORM_PATTERN = r'(.*/)?(ln_[^/]*|norm|[^/]*bn[^/]*)/(scale|bias)'

SCHEDULE_PRESETS: dict[str, Callable[..., list[Rule]]] = {
    'full': lambda sched=None: [('.*', dict(sched or {}))],
    'linear_probe': lambda sched=None: [(HEAD_PATTERN, dict(sched or {})), ('.*', None)],
    'bitfit': lambda sched=None: [(union(['.*bias', HEAD_PATTERN]), dict(sched or {})),
                                  ('.*', None)],
    'last_k': lambda sched=None, *, k, depth: [
        (union([_last_k_regex(k, depth), 'encoder/norm/.*', HEAD_PATTERN]), dict(sched or {})),
        ('.*', None)],
    # LayerNorm-only tuning (ViT ln_*/norm); also matches BatchNorm affine parameters of CNNs.
    'layernorm': lambda sched=None: [(union([NORM_PATTERN, HEAD_PATTERN]), dict(sched or {})),
                                     ('.*', None)],
}


def preset(name: str, sched: Mapping[str, Any] | None = None, **kwargs: Any) -> list[Rule]:
  """The schedule rules of a named preset, e.g. preset('last_k', sched, k=2, depth=12).

  Raises:
    ValueError: for an unknown preset or arguments (listing the valid ones).
  """
  if name not in SCHEDULE_PRESETS:
    raise ValueError(f'Unknown schedule preset {name!r}; valid: {sorted(SCHEDULE_PRESETS)}.')
  fn = SCHEDULE_PRESETS[name]
  try:
    inspect.signature(fn).bind(sched, **kwargs)
  except TypeError as e:
    raise ValueError(f'Schedule preset {name!r} takes {inspect.signature(fn)}: {e}') from None
  return fn(sched, **kwargs)


def count_params(params: Params, patterns: Sequence[str]) -> tuple[int, int]:
  """(trainable, total) parameter counts; trainable = leaves fully matching any pattern."""
  compiled = [re.compile(p) for p in patterns]
  trainable = total = 0
  for path, leaf in param_paths.flatten(params).items():
    size = int(getattr(leaf, 'size', 1))
    total += size
    trainable += size if any(rx.fullmatch(path) for rx in compiled) else 0
  return trainable, total
