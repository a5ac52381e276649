"""Composing adaptation transforms from `config.adapt`, and schedules that freeze the rest.

  config.model_name = 'vit'
  config.adapt = [dict(kind='lora', rank=8, alpha=16, targets='.*attn/(query|value)/kernel'),
                  dict(kind='vpt', mode='deep', num_tokens=10)]
  adaptation = compose.apply_transforms(config.adapt, config.model_name, config.model)
  model = models.get_model(config.model_name, num_classes=..., **adaptation.model_kwargs)
  params = adaptation.init_extra(model.init(rng, images)['params'], lora_rng)
  apply_fn = adaptation.wrap_apply(state.make_apply_fn(model))
  config.schedule = compose.schedule_for(adaptation, dict(decay_type='cosine'))
  export = adaptation.merge(params)          # LoRA folded into W; prompts / adapters kept

Transforms (the registry TRANSFORMS; each kind at most once) and what they make trainable:

  lora     rank, targets (regex or list), alpha=None (= rank), rslora=False, dora=False
           -> a `lora/` subtree added by init_extra, applied by wrap_apply       'lora/.*'
  vpt      mode ('shallow' | 'deep'), num_tokens, dropout=0.0  -> model prompt  'prompt/.*'
  ept      num_tokens (embedded prompt tuning)                  -> model prompt  'prompt/.*'
  adapter  ViT: mode ('sequential' | 'parallel'), dim, where, scale, act;
           EfficientNet: dim | reduction, blocks, act           -> model adapter '.*adapter.*'
  bitfit   (no options)                                                           '.*bias'

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

from fm_adapt.adapt import adapters, lora, masks, prompts
from fm_adapt.models import efficientnet

Params = dict[str, Any]
Rule = tuple[str, Any]
# What a transform contributes: (model kwarg updates, trainable patterns).
Contribution = tuple[dict[str, Any], list[str]]

HEAD_PATTERN = 'head/.*'


@dataclasses.dataclass(frozen=True)
class Adaptation:
  """What a list of transforms does to a model.

  Attributes:
    model_kwargs: the model's kwargs with the prompt / adapter fields set.
    init_extra: `init_extra(params, rng) -> params`, adding the transforms' own subtrees (LoRA)
      to an initialized (or `eval_shape`d) parameter tree.
    wrap_apply: wraps a `state.make_apply_fn`-style apply function (applies LoRA).
    trainable_patterns: regexes of the parameters the transforms make trainable.
    merge: `merge(params) -> params` for export (folds LoRA into the kernels).
    transforms: the checked transform configs, in order.
  """
  model_kwargs: dict[str, Any]
  init_extra: Callable[[Params, jax.Array], Params]
  wrap_apply: Callable[[Callable[..., Any]], Callable[..., Any]]
  trainable_patterns: list[str]
  merge: Callable[[Params], Params]
  transforms: tuple[dict[str, Any], ...] = ()


@dataclasses.dataclass(frozen=True)
class Transform:
  """One registry entry: its valid and required keys, and what it contributes.

  `build(cfg, model_name, model_kwargs) -> (model kwarg updates, trainable patterns)`.
  """
  keys: tuple[str, ...]
  required: tuple[str, ...]
  build: Callable[[dict[str, Any], str, Mapping[str, Any]], Contribution]


# Models taking the `prompt` / `adapter` fields, by model name.
PROMPT_MODELS = ('vit',)
ADAPTER_CHECKS: dict[str, Callable[[dict[str, Any], Mapping[str, Any]], Any]] = {
    'vit': lambda cfg, kwargs: adapters.check_vit_config(cfg),
    'efficientnet': lambda cfg, kwargs: adapters.check_cnn_config(
        cfg, len(efficientnet.decode_variant(kwargs.get('variant', 'lite0'))[1])),
}


def _lora(cfg: dict[str, Any], model_name: str,
          model_kwargs: Mapping[str, Any]) -> Contribution:
  del model_name, model_kwargs  # LoRA works on any model's Dense / 1x1 Conv kernels.
  if not cfg['targets']:
    raise ValueError("lora needs non-empty 'targets' (kernel path regexes).")
  lora.scaling(cfg['rank'], cfg.get('alpha'), rslora=cfg.get('rslora', False))  # Validates.
  return {}, ['lora/.*']


def _prompt_kwargs(model_name: str, prompt: dict[str, Any]) -> dict[str, Any]:
  if model_name not in PROMPT_MODELS:
    raise ValueError(f'Prompt tokens need a model with a prompt field: {list(PROMPT_MODELS)}; '
                     f'got {model_name!r}.')
  prompts.check_config(prompt)
  return {'prompt': prompt}


def _vpt(cfg: dict[str, Any], model_name: str,
         model_kwargs: Mapping[str, Any]) -> Contribution:
  del model_kwargs
  modes = ('shallow', 'deep')
  if cfg['mode'] not in modes:
    raise ValueError(f"Unknown vpt mode {cfg['mode']!r}; valid: {list(modes)}.")
  prompt = dict(kind=f"vpt_{cfg['mode']}", num_tokens=cfg['num_tokens'],
                dropout=cfg.get('dropout', 0.0))
  return _prompt_kwargs(model_name, prompt), ['prompt/.*']


def _ept(cfg: dict[str, Any], model_name: str,
         model_kwargs: Mapping[str, Any]) -> Contribution:
  del model_kwargs
  prompt = dict(kind='ept', num_tokens=cfg['num_tokens'])
  return _prompt_kwargs(model_name, prompt), ['prompt/.*']


def _adapter(cfg: dict[str, Any], model_name: str,
             model_kwargs: Mapping[str, Any]) -> Contribution:
  if model_name not in ADAPTER_CHECKS:
    raise ValueError(f'Adapters need a model with an adapter field: {sorted(ADAPTER_CHECKS)}; '
                     f'got {model_name!r}.')
  adapter = {k: v for k, v in cfg.items() if k not in ('kind', 'mode')}
  if model_name == 'vit':
    if 'mode' not in cfg:
      raise ValueError(f"adapter on 'vit' needs mode: one of {list(adapters.VIT_KINDS)}.")
    adapter['kind'] = cfg['mode']
  elif 'mode' in cfg:
    raise ValueError(f'adapter on {model_name!r} takes no mode (a residual bottleneck after '
                     'each chosen block).')
  ADAPTER_CHECKS[model_name](adapter, model_kwargs)
  return {'adapter': adapter}, ['.*adapter.*']


def _bitfit(cfg: dict[str, Any], model_name: str,
            model_kwargs: Mapping[str, Any]) -> Contribution:
  del cfg, model_name, model_kwargs
  return {}, ['.*bias']


TRANSFORMS: dict[str, Transform] = {
    'lora': Transform(('kind', 'rank', 'targets', 'alpha', 'rslora', 'dora'),
                      ('rank', 'targets'), _lora),
    'vpt': Transform(('kind', 'mode', 'num_tokens', 'dropout'), ('mode', 'num_tokens'), _vpt),
    'ept': Transform(('kind', 'num_tokens'), ('num_tokens',), _ept),
    'adapter': Transform(('kind', 'mode', 'dim', 'reduction', 'where', 'scale', 'act', 'blocks'),
                         (), _adapter),
    'bitfit': Transform(('kind',), (), _bitfit),
}


def check_transform(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """Checks one transform config's kind and keys against TRANSFORMS.

  Raises:
    ValueError: for an unknown kind (listing valid kinds), unknown keys or missing keys
      (listing the valid keys of that kind).
  """
  cfg = dict(cfg)
  kind = cfg.get('kind')
  if kind not in TRANSFORMS:
    raise ValueError(f'Unknown adaptation kind {kind!r}; valid kinds: {sorted(TRANSFORMS)}.')
  spec = TRANSFORMS[kind]
  unknown = sorted(set(cfg) - set(spec.keys))
  missing = [k for k in spec.required if k not in cfg]
  if unknown or missing:
    what = f'unknown keys {unknown}' if unknown else f'missing keys {missing}'
    raise ValueError(f'Adaptation {kind!r}: {what}; valid keys: {list(spec.keys)}, '
                     f'required: {list(spec.required)}.')
  return cfg


def _targets(cfg: Mapping[str, Any]) -> list[str]:
  targets = cfg['targets']
  return [targets] if isinstance(targets, str) else list(targets)


def _make_init_extra(lora_cfg: Mapping[str, Any] | None):
  def init_extra(params: Params, rng: jax.Array) -> Params:
    if lora_cfg is None:
      return dict(params)
    if lora.LORA_KEY in params:
      raise ValueError("params already hold a 'lora' subtree.")
    mask = masks.make_mask(params, _targets(lora_cfg))
    selected = [p for p, m in masks.flatten(mask).items() if m]
    logging.info('LoRA rank %d on %d kernels: %s', lora_cfg['rank'], len(selected), selected)
    tree = lora.init(params, mask, lora_cfg['rank'], rng, dora=lora_cfg.get('dora', False))
    return dict(params, **{lora.LORA_KEY: tree})
  return init_extra


def _lora_scale(cfg: Mapping[str, Any]) -> float:
  return lora.scaling(cfg['rank'], cfg.get('alpha'), rslora=cfg.get('rslora', False))


def apply_transforms(adapt_cfgs: Sequence[Mapping[str, Any]] | None, model_name: str,
                     model_kwargs: Mapping[str, Any] | None = None, *,
                     train_head: bool = True) -> Adaptation:
  """Builds the `Adaptation` of a list of transform configs (`config.adapt`).

  Args:
    adapt_cfgs: transform dicts, each with a 'kind' in TRANSFORMS (None or [] adapts nothing).
    model_name: the model's name in `fm_adapt.models.MODELS` ('vit', 'resnet', 'efficientnet').
    model_kwargs: the model's configuration (`config.model`); not modified.
    train_head: add 'head/.*' to the trainable patterns.

  Returns:
    The Adaptation.

  Raises:
    ValueError: for unknown kinds or keys, a kind given twice, a model that lacks a needed field,
      or a prompt / adapter field the model kwargs already set.
  """
  kwargs, patterns, checked, lora_cfg = dict(model_kwargs or {}), [], [], None
  for cfg in adapt_cfgs or ():
    cfg = check_transform(cfg)
    if any(c['kind'] == cfg['kind'] for c in checked):
      raise ValueError(f"Adaptation kind {cfg['kind']!r} given twice; combine them into one.")
    updates, new_patterns = TRANSFORMS[cfg['kind']].build(cfg, model_name, kwargs)
    clash = sorted(k for k in updates if kwargs.get(k) is not None)
    if clash:
      raise ValueError(f"Adaptation {cfg['kind']!r} sets model field(s) {clash}, already set "
                       f'to {[kwargs[k] for k in clash]}.')
    kwargs.update(updates)
    patterns += [p for p in new_patterns if p not in patterns]
    checked.append(cfg)
    lora_cfg = cfg if cfg['kind'] == 'lora' else lora_cfg
  if train_head and HEAD_PATTERN not in patterns:
    patterns.append(HEAD_PATTERN)
  if lora_cfg is None:
    wrap, merge = (lambda fn: fn), (lambda params: dict(params))
  else:
    scale = _lora_scale(lora_cfg)
    wrap = lambda fn: lora.wrap_apply_fn(fn, scale=scale)
    merge = lambda params: lora.merge(params, params[lora.LORA_KEY], scale=scale)
  return Adaptation(model_kwargs=kwargs, init_extra=_make_init_extra(lora_cfg), wrap_apply=wrap,
                    trainable_patterns=patterns, merge=merge, transforms=tuple(checked))


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
  for path, leaf in masks.flatten(params).items():
    size = int(getattr(leaf, 'size', 1))
    total += size
    trainable += size if any(rx.fullmatch(path) for rx in compiled) else 0
  return trainable, total
