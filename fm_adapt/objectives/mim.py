"""Masked image modelling objectives: SimMIM, MAE, frequency and deblurring targets.

Each objective is a pure function `objective(apply_fn, params, model_state, batch, rng) ->
(loss, new_model_state, aux)` of the one update step (`fm_adapt.train.step`); the model is
`fm_adapt.models.mim.Model` ('vit_mim'). A draw of the objective (`Task`) corrupts the batch's
images into the model's input and says which patches the loss covers; the labels are ignored.

  simmim     patches masked (mask token in the encoder input; decoder_type='linear'), L1 on the
             pixels of the masked patches only (Xie et al. 2022).
  mae        the encoder sees only the visible patches (decoder_type='transformer'), MSE on the
             masked patches of the per-patch normalised pixels (He et al. 2022; norm_pix=False:
             raw pixels).
  frequency  a radial band [r0, r1) of each image's 2-D spectrum is removed and the full image is
             reconstructed (USFM); with `mask` also patches are masked ("dual"). L1 on the
             whole image: the band removal changes every pixel. decoder_type='linear'.
  deblur     the input is Gaussian-blurred (sigma uniform in [lo, hi] per image; with `mask`
             also masked), the target is the sharp image; L1 on the whole image.
             decoder_type='linear'.

The loss is a mean over the real rows of the batch (`batch['mask']`) and over the covered
patches' pixels; every row covers the same number of patches (masks are exact), so it weighs
rows equally, as the gradient accumulation of the update step assumes.

Config: config.model_name = 'vit_mim' and config.loss = dict(name='simmim', mask=dict(
name='random', ratio=0.6)); see `DEFAULTS` for every objective's keys and their defaults,
`fm_adapt.objectives.masking` for the masks. `fm_adapt.train.model_fns.build_model` gives the
model the decoder the objective needs (`DECODERS`) and no head.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fm_adapt.objectives import base
from fm_adapt.objectives import masking
from fm_adapt.objectives import mim_targets

Array = jax.Array

DEFAULTS: dict[str, dict[str, Any]] = {
    'simmim': dict(mask=dict(name='random', ratio=0.6)),
    'mae': dict(mask=dict(name='random', ratio=0.75), norm_pix=True),
    'frequency': dict(band=(0.2, 0.6), mask=None),
    'deblur': dict(sigma=(0.5, 2.0), mask=None),
}
NAMES = tuple(DEFAULTS)
# The decoder of `fm_adapt.models.mim.Model` each objective needs.
DECODERS = {'simmim': 'linear', 'mae': 'transformer', 'frequency': 'linear', 'deblur': 'linear'}


def model_kwargs(name: str, kwargs: dict[str, Any]) -> dict[str, Any]:
  """The MIM model's kwargs with the decoder_type of objective `name` (set when absent).

  Raises:
    ValueError: a decoder_type given in config.model that the objective cannot use.
  """
  given = kwargs.get('decoder_type')
  if given is not None and given != DECODERS[name]:
    raise ValueError(f"config.loss.name={name!r} needs config.model.decoder_type="
                     f"{DECODERS[name]!r}, got {given!r} (leave it out to get the right one).")
  return {**kwargs, 'decoder_type': DECODERS[name]}


@dataclasses.dataclass(frozen=True)
class Task:
  """One draw of an objective on a batch of images.

  Attributes:
    inputs: the model's input images [B, H, W, C] (blurred, band-removed, or the images).
    model_kwargs: the masking arguments of the model: patch_mask [B, N] or keep [B, K].
    target: [B, N, p*p*C] the pixels to predict.
    weights: [B, N] float, 1 on the patches the loss covers.
    patch_mask: [B, N] bool, the masked patches (all False when nothing is masked).
  """
  inputs: Array
  model_kwargs: dict[str, Array]
  target: Array
  weights: Array
  patch_mask: Array


def visible_indices(patch_mask: Array, num_visible: int) -> Array:
  """The indices [B, K] of the unmasked patches of patch_mask [B, N], ascending.

  `num_visible` (static) must be each row's number of False entries (masks are exact).
  """
  return jnp.argsort(patch_mask, axis=-1, stable=True)[:, :num_visible].astype(jnp.int32)


def per_patch_error(pred: Array, target: Array, kind: str) -> Array:
  """Mean over each patch's pixels of |pred - target| ('l1') or (pred - target)^2 ('mse')."""
  diff = pred.astype(jnp.float32) - target.astype(jnp.float32)
  return jnp.mean(jnp.abs(diff) if kind == 'l1' else diff * diff, axis=-1)


def weighted_mean(errors: Array, weights: Array, rows: Array) -> Array:
  """sum(errors * weights over real rows) / sum(weights over real rows); [B, N] -> scalar."""
  w = weights.astype(jnp.float32) * rows.astype(jnp.float32)[:, None]
  return jnp.sum(errors * w) / jnp.maximum(jnp.sum(w), 1.0)


def reconstruction_loss(pred: Array, target: Array, weights: Array, rows: Array,
                        kind: str) -> Array:
  """The objectives' loss: the mean `kind` error over the covered patches of the real rows."""
  return weighted_mean(per_patch_error(pred, target, kind), weights, rows)


def _spatial(mask_draw, rng, images, patch_size):
  """patch_mask [B, N] of a mask draw, or all False without one."""
  if mask_draw is None:
    b, h, w, _ = images.shape
    return jnp.zeros((b, (h // patch_size) * (w // patch_size)), bool)
  return mask_draw(rng, images, patch_size)


def simmim_task(rng, images, *, patch_size, mask_draw, **_) -> Task:
  """Masked patches as mask tokens; the loss covers them only."""
  patch_mask = mask_draw(rng, images, patch_size)
  return Task(images, {'patch_mask': patch_mask}, mim_targets.patchify(images, patch_size),
              patch_mask.astype(jnp.float32), patch_mask)


def mae_task(rng, images, *, patch_size, mask_draw, ratio, norm_pix, **_) -> Task:
  """The visible patches only enter the encoder; the loss covers the masked ones."""
  patch_mask = mask_draw(rng, images, patch_size)
  n = patch_mask.shape[1]
  keep = visible_indices(patch_mask, n - masking.num_masked(n, ratio))
  target = mim_targets.patchify(images, patch_size)
  if norm_pix:
    target = mim_targets.normalize_patches(target)
  return Task(images, {'keep': keep}, target, patch_mask.astype(jnp.float32), patch_mask)


def frequency_task(rng, images, *, patch_size, mask_draw, band, **_) -> Task:
  """The band removed (and patches masked when dual); the whole image is the target."""
  inputs = mim_targets.remove_frequency_band(images, band)
  patch_mask = _spatial(mask_draw, rng, images, patch_size)
  kwargs = {'patch_mask': patch_mask} if mask_draw is not None else {}
  return Task(inputs, kwargs, mim_targets.patchify(images, patch_size),
              jnp.ones(patch_mask.shape, jnp.float32), patch_mask)


def deblur_task(rng, images, *, patch_size, mask_draw, sigma, **_) -> Task:
  """Blurred (and masked) input; the sharp image is the target, whole."""
  blur_rng, mask_rng = jax.random.split(rng)
  lo, hi = (float(s) for s in sigma)
  sigmas = jax.random.uniform(blur_rng, (images.shape[0],), minval=lo, maxval=hi)
  inputs = mim_targets.gaussian_blur(images, sigmas, hi)
  patch_mask = _spatial(mask_draw, mask_rng, images, patch_size)
  kwargs = {'patch_mask': patch_mask} if mask_draw is not None else {}
  return Task(inputs, kwargs, mim_targets.patchify(images, patch_size),
              jnp.ones(patch_mask.shape, jnp.float32), patch_mask)


_TASKS = {'simmim': (simmim_task, 'l1'), 'mae': (mae_task, 'mse'),
          'frequency': (frequency_task, 'l1'), 'deblur': (deblur_task, 'l1')}


def predict(apply_fn: Callable[..., Any], params: Any, model_state: Any, task: Task,
            rows: Array | None, rng: Array | None, train: bool) -> tuple[Array, Any]:
  """The model's pixels [B, N, p*p*C] for a task's input, and its new state.

  Raises:
    ValueError: a model without a pixel decoder (no out['pred']).
  """
  _, out, new_state = apply_fn(params, model_state, task.inputs, train=train, rng=rng,
                               mask=rows, **task.model_kwargs)
  if 'pred' not in out:
    raise ValueError("Masked image modelling needs a model with a pixel decoder: set "
                     "config.model_name='vit_mim' (fm_adapt.models.mim).")
  if out['pred'].shape != task.target.shape:
    raise ValueError(f"The model predicts patches {out['pred'].shape} but the target is "
                     f'{task.target.shape}: the objective patch size must be the model\'s.')
  return out['pred'], new_state


@dataclasses.dataclass(frozen=True)
class MimObjective(base.Objective):
  """A configured MIM objective; call it as the update step does.

  Attributes:
    name: a key of DEFAULTS.
    patch_size: the model's patch size.
    options: the objective's keys with their defaults filled in (mask: the mask entry).
  """
  name: str
  patch_size: int
  options: Mapping[str, Any]

  def draw(self, rng: Array, images: Array) -> Task:
    """One draw of the objective's corruption of images [B, H, W, C]."""
    options = dict(self.options)
    mask = options.pop('mask')
    mask_draw = masking.mask_fn(mask) if mask else None
    ratio = float(mask['ratio']) if mask else None
    task_fn, _ = _TASKS[self.name]
    return task_fn(rng, images, patch_size=self.patch_size, mask_draw=mask_draw, ratio=ratio,
                   **options)

  def __call__(self, apply_fn, params, model_state, batch, rng):
    """(loss, new model state, {}) on a batch dict(image, mask[, label: ignored])."""
    draw_rng, model_rng = jax.random.split(rng)
    task = self.draw(draw_rng, batch['image'])
    pred, new_state = predict(apply_fn, params, model_state, task, batch['mask'], model_rng,
                              train=True)
    loss = reconstruction_loss(pred, task.target, task.weights, batch['mask'], _TASKS[self.name][1])
    return loss, new_state, {}

  def views(self, apply_fn, params, model_state, images, rng) -> dict[str, np.ndarray]:
    """Images [B, H, W, C] to look at: 'input', 'model_input' (masked patches at 0) and
    'reconstruction' (MAE's normalised patches scaled back with the input's statistics)."""
    task = self.draw(rng, images)
    pred, _ = predict(apply_fn, params, model_state, task, None, None, train=False)
    p, (_, h, w, c) = self.patch_size, images.shape
    if self.name == 'mae' and self.options['norm_pix']:
      raw = mim_targets.patchify(images, p)
      pred = pred * jnp.sqrt(raw.var(-1, keepdims=True) + 1e-6) + raw.mean(-1, keepdims=True)
    grid = (h // p, w // p)
    shown = mim_targets.patchify(task.inputs, p) * (~task.patch_mask)[..., None]
    return {'input': np.asarray(images),
            'model_input': np.asarray(mim_targets.unpatchify(shown, p, grid, c)),
            'reconstruction': np.asarray(mim_targets.unpatchify(pred, p, grid, c))}


def check_spec(name: str, spec: Mapping[str, Any]) -> dict[str, Any]:
  """The objective's options with defaults filled in; checks keys, mask and values.

  Raises:
    ValueError: unknown keys (listing the valid ones), a bad mask entry, band or sigma.
  """
  options = dict(DEFAULTS[name])
  unknown = sorted(set(spec) - set(options))
  if unknown:
    raise ValueError(f'Unknown key(s) {unknown} of config.loss for {name!r}; valid: '
                     f'{sorted(options)} (and name).')
  options.update(spec)
  mask = options['mask']
  if mask is not None:
    mask = dict(mask.to_dict() if hasattr(mask, 'to_dict') else mask)
    masking.mask_fn(mask)  # Checks it.
  elif name in ('simmim', 'mae'):
    raise ValueError(f"{name!r} needs config.loss.mask, e.g. dict(name='random', ratio=0.6).")
  options['mask'] = mask
  if name == 'frequency':
    options['band'] = mim_targets.check_band(options['band'])
  if name == 'deblur':
    lo, hi = (float(v) for v in options['sigma'])
    if not 0 < lo <= hi:
      raise ValueError(f'config.loss.sigma must be (lo, hi) with 0 < lo <= hi, got '
                       f"{options['sigma']}.")
    options['sigma'] = (lo, hi)
  return options


def get_objective(spec: Mapping[str, Any], patch_size: int | None) -> MimObjective:
  """The MIM objective of a config.loss entry dict(name=..., **options).

  Raises:
    ValueError: an unknown name (listing them), bad options, or no patch size (a model
      without patches).
  """
  spec = dict(spec.to_dict() if hasattr(spec, 'to_dict') else spec)
  name = spec.pop('name', None)
  if name not in DEFAULTS:
    raise ValueError(f'Unknown MIM objective {name!r}; valid: {list(NAMES)}.')
  if not patch_size:
    raise ValueError(f'The {name!r} objective reconstructs patches: it needs a ViT model '
                     "(config.model_name='vit_mim') and its patch size.")
  return MimObjective(name, int(patch_size), check_spec(name, spec))
