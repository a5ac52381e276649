"""Bottleneck adapters: down-projection, nonlinearity, zero-initialized up-projection.

An adapter is a small residual branch `up(act(down(h)))` added into a frozen network. Its
up-projection (kernel and bias) starts at zero, so at initialization every adapter outputs exactly
zero and the adapted model computes exactly the base model's function.

Like LoRA (`fm_adapt.adapt.lora`), adapters are a pure pytree transform attached from outside:
`init` makes their parameters from the base parameters, and `wrap_apply_fn` takes them out of the
parameters and adds them by intercepting module calls (`flax.linen.intercept_methods`). The
model holds no adapter code:

  params = param_paths.merge(base_params, adapters.init(base_params, cfg, 'vit', rng))
  apply_fn = adapters.wrap_apply_fn(state.make_apply_fn(model), cfg, 'vit')

Where adapters go is data, per model family (`PLACEMENTS`): a `Site` names, relative to each
module instance whose path matches its `prefix`, the module whose output receives the adapter,
the module whose input a 'parallel' adapter reads, and the adapter's parameter subtree. A new
model family needs an entry there, never an edit of the model. Every adapter parameter path
contains 'adapter', so the schedule rule `'.*adapter.*'` selects them.

  ViT, per encoder block, parameters `encoder/block_{i}/adapter_{attn,mlp}/{down,up}/...`:
    'sequential'  Houlsby et al. (2019): on the output y of the attention and/or MLP branch
                  (after its dropout), before the residual add: y <- y + scale * adapter(y).
    'parallel'    He et al. (2022, "Towards a unified view of parameter-efficient transfer
                  learning"), as AdaptFormer (Chen et al., 2022) places it in a pre-norm ViT: the
                  adapter reads the branch's input x (the residual stream, before the LayerNorm)
                  and is added to the branch output: y <- y + scale * adapter(x).
  EfficientNet-Lite, after each chosen MBConv block (its output h, after the block's own
  residual), parameters `block_{i}/adapter/{down,up}/...`: h <- h + adapter(h), a residual 1x1
  bottleneck, written as dense layers over the channel axis (kernels [C, dim] and [dim, C]).

Config keys (`check_config`): mode ('sequential' | 'parallel', default 'sequential'), dim (the
bottleneck width) or reduction (width = max(C // reduction, 1)), where (site names, default all),
blocks (indices of the site instances, default all; negative from the end), scale (default 1),
act (default: the family's own nonlinearity).
"""
from __future__ import annotations

import contextlib
import dataclasses
import re
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fm_adapt import config as config_lib
from fm_adapt import param_paths
from fm_adapt.models import activations

ACTIVATIONS = {
    'gelu': activations.gelu,
    'relu': jax.nn.relu,
    'relu6': jax.nn.relu6,
    'silu': jax.nn.silu,
}
MODES = ('sequential', 'parallel')
KEYS = ('mode', 'dim', 'reduction', 'where', 'blocks', 'scale', 'act')


@dataclasses.dataclass(frozen=True)
class Site:
  """A place adapters attach, once per module instance whose path fully matches `prefix`.

  Attributes:
    prefix: regex of the instances' module paths, e.g. r'encoder/block_\\d+'.
    width: parameter under an instance whose last axis is the channel width C at the site.
    output: module under the instance whose call output receives the adapter ('' = itself).
    source: module under the instance whose call input a 'parallel' adapter reads; None: only
      'sequential' adapters fit here.
    name: the adapter's parameter subtree under the instance.
  """
  prefix: str
  width: str
  output: str
  source: str | None
  name: str


@dataclasses.dataclass(frozen=True)
class Placement:
  """The adapter sites of a model family and its default nonlinearity."""
  sites: dict[str, Site]
  act: str


PLACEMENTS: dict[str, Placement] = {
    'vit': Placement({
        'attn': Site(r'encoder/block_\d+', 'ln_attn/scale', 'drop_attn', 'ln_attn',
                     'adapter_attn'),
        'mlp': Site(r'encoder/block_\d+', 'ln_mlp/scale', 'drop_mlp', 'ln_mlp', 'adapter_mlp'),
    }, act='gelu'),
    'efficientnet': Placement({
        'block': Site(r'block_\d+', 'project_bn/scale', '', None, 'adapter'),
    }, act='relu6'),
}


def init_bottleneck(rng: jax.Array, width: int, dim: int) -> dict[str, Any]:
  """Parameters of one adapter on C=`width` channels: down [C, dim] (lecun normal), up zero."""
  return {'down': {'kernel': nn.initializers.lecun_normal()(rng, (width, dim), jnp.float32),
                   'bias': jnp.zeros((dim,), jnp.float32)},
          'up': {'kernel': jnp.zeros((dim, width), jnp.float32),
                 'bias': jnp.zeros((width,), jnp.float32)}}


def bottleneck(params: Mapping[str, Any], x: jax.Array, act: str) -> jax.Array:
  """`up(act(down(x)))` over the last axis of x, computed in x's dtype (zero at init)."""
  down, up = params['down'], params['up']
  h = ACTIVATIONS[act](x @ down['kernel'].astype(x.dtype) + down['bias'].astype(x.dtype))
  return h @ up['kernel'].astype(x.dtype) + up['bias'].astype(x.dtype)


def _positive_int(value: Any, what: str) -> int:
  if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
    raise ValueError(f'adapter {what} must be a positive int, got {value!r}.')
  return value


def _placement(model_name: str) -> Placement:
  if model_name not in PLACEMENTS:
    raise ValueError(f'Adapters have no placement for model {model_name!r}; placements: '
                     f'{sorted(PLACEMENTS)} (add one to adapters.PLACEMENTS).')
  return PLACEMENTS[model_name]


def check_config(cfg: Mapping[str, Any], model_name: str) -> dict[str, Any]:
  """Validates and completes an adapter config for a model family.

  Returns:
    dict(mode, where (tuple of site names), blocks (tuple or None), scale, act) plus exactly one
    of dim / reduction.

  Raises:
    ValueError: for unknown keys or values (listing the valid ones), a missing or doubled width,
      or 'parallel' on a site that has no input to read.
  """
  placement, cfg = _placement(model_name), dict(cfg)
  cfg = config_lib.check_known_keys(cfg, KEYS, 'an adapter config')
  mode = cfg.get('mode', 'sequential')
  if mode not in MODES:
    raise ValueError(f'Unknown adapter mode {mode!r}; valid: {list(MODES)}.')
  where = cfg.get('where', tuple(placement.sites))
  where = (where,) if isinstance(where, str) else tuple(where)
  if not where or any(w not in placement.sites for w in where):
    raise ValueError(f'adapter where={where!r}; valid on {model_name!r}: a non-empty subset of '
                     f'{list(placement.sites)}.')
  no_source = [w for w in where if placement.sites[w].source is None]
  if mode == 'parallel' and no_source:
    raise ValueError(f"adapter mode 'parallel' reads a site's input, which {no_source} on "
                     f"{model_name!r} do not define; use mode='sequential'.")
  if ('dim' in cfg) == ('reduction' in cfg):
    raise ValueError(f"adapter needs exactly one of 'dim' or 'reduction', got {sorted(cfg)}.")
  act = cfg.get('act', placement.act)
  if act not in ACTIVATIONS:
    raise ValueError(f'Unknown adapter act {act!r}; valid: {sorted(ACTIVATIONS)}.')
  blocks = cfg.get('blocks')
  out = dict(mode=mode, where=where, blocks=None if blocks is None else tuple(blocks),
             scale=float(cfg.get('scale', 1.0)), act=act)
  width_key = 'dim' if 'dim' in cfg else 'reduction'
  out[width_key] = _positive_int(cfg[width_key], width_key)
  return out


def _natural(path: str) -> list[Any]:
  return [int(t) if t.isdigit() else t for t in re.split(r'(\d+)', path)]


def _instances(flat: Mapping[str, Any], site: Site, blocks: tuple[int, ...] | None,
               site_name: str) -> list[str]:
  """The instance paths of a site in a flat parameter tree, selected by `blocks`."""
  rx = re.compile(f'({site.prefix})/{re.escape(site.width)}')
  found = sorted({m.group(1) for p in flat if (m := rx.fullmatch(p))}, key=_natural)
  if not found:
    raise ValueError(f'Adapter site {site_name!r} ({site.prefix}/{site.width}) matches no '
                     f'parameter; closest paths: '
                     f'{param_paths.closest_paths(f"{site.prefix}/{site.width}", flat)}.')
  if blocks is None:
    return found
  bad = [b for b in blocks if not -len(found) <= b < len(found)]
  if bad:
    raise ValueError(f'adapter blocks {bad} out of range for {len(found)} blocks.')
  return [found[b] for b in sorted({b % len(found) for b in blocks})]


def init(params: Mapping[str, Any], cfg: Mapping[str, Any], model_name: str, rng: jax.Array
         ) -> dict[str, Any]:
  """Creates the adapter parameters for base parameters `params`.

  Args:
    params: the base parameters (arrays or ShapeDtypeStructs).
    cfg: an adapter config (`check_config`).
    model_name: the model family, a key of PLACEMENTS.
    rng: PRNG key; one split key per adapter, in sorted path order.

  Returns:
    A tree holding only the adapters' leaves (e.g. encoder/block_0/adapter_attn/down/kernel),
    to merge into params with `param_paths.merge`.

  Raises:
    ValueError: for a bad config, a site that matches no parameter, blocks out of range, or
      params that already hold adapters.
  """
  cfg, placement = check_config(cfg, model_name), _placement(model_name)
  flat = param_paths.flatten(params)
  targets = {}
  for site_name in cfg['where']:
    site = placement.sites[site_name]
    for prefix in _instances(flat, site, cfg['blocks'], site_name):
      channels = flat[f'{prefix}/{site.width}'].shape[-1]
      targets[f'{prefix}/{site.name}'] = (channels, cfg['dim'] if 'dim' in cfg
                                          else max(channels // cfg['reduction'], 1))
  clash = sorted(t for t in targets if any(p.startswith(t + '/') for p in flat))
  if clash:
    raise ValueError(f'params already hold adapters {clash}.')
  keys = jax.random.split(rng, len(targets))
  out = {path: init_bottleneck(key, *targets[path]) for key, path in zip(keys, sorted(targets))}
  return param_paths.unflatten({f'{path}/{leaf}': value for path, tree in out.items()
                          for leaf, value in param_paths.flatten(tree).items()})


def _split(params: Mapping[str, Any], cfg: Mapping[str, Any], placement: Placement
           ) -> tuple[dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
  """(params without adapters, {(site name, instance path): adapter parameters})."""
  rest, found = {}, {}
  patterns = {w: re.compile(f'({placement.sites[w].prefix})/{placement.sites[w].name}/(.+)')
              for w in cfg['where']}
  for path, leaf in param_paths.flatten(params).items():
    hit = next(((w, m) for w, rx in patterns.items() if (m := rx.fullmatch(path))), None)
    if hit is None:
      rest[path] = leaf
    else:
      found.setdefault((hit[0], hit[1].group(1)), {})[hit[1].group(2)] = leaf
  return param_paths.unflatten(rest), {k: param_paths.unflatten(v) for k, v in found.items()}


def _join(prefix: str, name: str) -> str:
  return f'{prefix}/{name}' if name else prefix


def _interceptor(found: Mapping[tuple[str, str], Any], cfg: Mapping[str, Any],
                 placement: Placement, used: set[tuple[str, str]]):
  """A `nn.intercept_methods` interceptor adding the adapters of `found` at their sites."""
  outputs = {_join(p, placement.sites[w].output): (w, p) for w, p in found}
  sources = ({_join(p, placement.sites[w].source): (w, p) for w, p in found}
             if cfg['mode'] == 'parallel' else {})
  captured = {}

  def intercept(next_fun, args, kwargs, context):
    if context.method_name != '__call__':
      return next_fun(*args, **kwargs)
    path = '/'.join(context.module.path)
    if path in sources:
      captured[sources[path]] = args[0]
    y = next_fun(*args, **kwargs)
    if path not in outputs:
      return y
    key = outputs[path]
    used.add(key)
    if cfg['mode'] == 'sequential':
      x = y
    elif key in captured:
      x = captured.pop(key)
    else:
      raise ValueError(f'The parallel adapter at {path!r} reads the input of '
                       f'{_join(key[1], placement.sites[key[0]].source)!r}, not called before.')
    return y + cfg['scale'] * bottleneck(found[key], x, cfg['act']).astype(y.dtype)

  return intercept


@contextlib.contextmanager
def intercept(found: Mapping[tuple[str, str], Any], cfg: Mapping[str, Any], model_name: str
              ) -> Iterator[None]:
  """Context in which `model.apply` adds the adapters `found` ({(site, instance): params}).

  Raises:
    ValueError: on exit, if some adapter's site was never called (or, for 'parallel', its
      source was not called first).
  """
  cfg, placement, used = check_config(cfg, model_name), _placement(model_name), set()
  with nn.intercept_methods(_interceptor(found, cfg, placement, used)):
    yield
  unused = sorted(f'{p}/{placement.sites[w].name}' for w, p in set(found) - used)
  if unused:
    raise ValueError(f'Adapters {unused} found no call of their site in the model.')


def wrap_apply_fn(apply_fn: Callable[..., Any], cfg: Mapping[str, Any], model_name: str
                  ) -> Callable[..., Any]:
  """Wraps a `state.make_apply_fn` function so that it applies the adapters in `params`.

  Args:
    apply_fn: `apply_fn(params, model_state, images, *, train, rng, **kwargs)`.
    cfg: the adapter config the adapters were made with (`init`).
    model_name: the model family, a key of PLACEMENTS.

  Returns:
    The same signature; the adapter subtrees are removed from `params` before the model sees
    them and added at their sites through `intercept`.
  """
  cfg = check_config(cfg, model_name)
  placement = _placement(model_name)

  def wrapped(params, model_state, images, *, train: bool, rng: jax.Array | None, **kwargs):
    params, found = _split(params, cfg, placement)
    if not found:
      raise ValueError(f'The adapter config {cfg} found no adapter parameters in params '
                       '(adapters.init).')
    with intercept(found, cfg, model_name):
      return apply_fn(params, model_state, images, train=train, rng=rng, **kwargs)

  return wrapped
