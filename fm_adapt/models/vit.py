"""Vision Transformer (ViT) in Flax linen.

Follows the plain ViT of Dosovitskiy et al. (2021) as laid out in big_vision, with parameter
names fixed for checkpoint importers and LoRA selectors:

  embedding/{kernel [p,p,C,D], bias}         patch embedding (VALID conv, stride p; no bias
                                             with patch_bias=False, as CLIP)
  cls [1,1,D]                                class token (class_token, default: pool_type='tok')
  cls_pos_embedding [1,1,D]                  position embedding of the class token, added to cls
                                             (class_posemb; the class row of timm / DINOv2 /
                                             MAE / CLIP checkpoints)
  registers [1,R,D]                          register tokens (num_registers=R > 0, DINOv2-reg)
  pos_embedding [1,N,D]                      learned position embedding of the N patches
  ln_pre/{scale,bias}                        LayerNorm before the encoder (pre_norm, CLIP ln_pre)
  encoder/block_{i}/ln_attn/{scale,bias}
  encoder/block_{i}/attn/{query,key,value,out}/{kernel [D,D],bias [D]}
  encoder/block_{i}/ls_attn/scale [D]        LayerScale of the attention branch (layerscale)
  encoder/block_{i}/ln_mlp/{scale,bias}
  encoder/block_{i}/mlp/{fc1,fc2}/{kernel,bias}
  encoder/block_{i}/ls_mlp/scale [D]         LayerScale of the MLP branch (layerscale)
  encoder/norm/{scale,bias}                  final norm of all tokens (absent with fc_norm)
  fc_norm/{scale,bias}                       norm of the pooled features (fc_norm, MAE / RETFound)
  proj/kernel [D,P]                          projection of the pooled features (proj_dim=P, CLIP)
  head/{kernel,bias}                         only when num_classes is set

Module paths (also calls that adaptation transforms may intercept from outside, the way
`flax.linen.intercept_methods` lets them; this module knows nothing of adaptation):

  embedding                                  patch embedding, `__call__(image)`
  encoder                                    `__call__(tokens [B,T,D], deterministic)`: blocks
                                             and the final norm
  encoder/block_{i}                          `__call__(tokens [B,T,D], deterministic)`
  encoder/block_{i}/ln_attn, attn, drop_attn the attention branch: its input (the residual
                                             stream) enters ln_attn, its output leaves drop_attn
  encoder/block_{i}/attn/core                `__call__(q, k, v) -> [B,T,H,d]`, the attention
                                             itself (`DotProductAttention`, no parameters)
  encoder/block_{i}/ln_mlp, mlp, drop_mlp    the MLP branch, likewise

Conventions worth knowing:
  * Token layout is [cls?, registers..., patches...]; code that wants the patches takes the
    *last* N tokens. Registers are never pooled ('gap' averages the patches, 'tok' takes cls).
  * `pos_embedding` covers only the patch tokens; registers get no position embedding (DINOv2
    adds its position rows before it inserts the registers). timm / DINOv2 / MAE / CLIP give
    the class token a position row too (row 0 of their `pos_embed`). With `class_posemb=True`
    the model keeps that row as its own parameter `cls_pos_embedding`, added to `cls`, so its
    parameters are the reference's one for one; like every family, it never resizes the class
    row (only the patch grid is interpolated). With the default `class_posemb=False` (as in
    big_vision) there is no such parameter and an importer folds the row into the class token
    exactly (a constant added to a learned constant): `cls = cls + pos_embed[:, :1]`, D
    parameters fewer than the reference (e.g. ViT-B/16: 86,566,888 vs timm's 86,567,656).
  * With `posemb_grid` set, `pos_embedding` keeps that grid (the pretraining resolution, e.g.
    37x37 for DINOv2 at 518 px) and is resized to the image's grid in every forward pass with
    the family's own method (`posemb_resize`: DINOv2's offset bicubic, timm's antialiased
    bicubic, Hugging Face's bicubic), so one checkpoint runs at 518, 224 or 28 px unchanged.
  * Blocks are pre-norm: x + ls_attn(attn(ln_attn(x))), then the same with the MLP. The MLP
    activation is the exact erf GELU (`mlp_act='gelu'`, timm / PyTorch `nn.GELU()`) or OpenAI
    CLIP's QuickGELU x * sigmoid(1.702 x) (`mlp_act='quick_gelu'`).
  * LayerNorm epsilon is 1e-6 (big_vision / timm / DINOv2); CLIP towers use 1e-5 (`ln_epsilon`).
  * Parameters are float32; `dtype` only sets the compute dtype. Logits are returned in float32.
  * Masked image modelling needs two things of the encoder, both arguments of `__call__` (the
    model holds no mask token and knows nothing of objectives; `fm_adapt.models.mim` does):
    `patch_mask` + `mask_token` replace the patch embeddings at masked positions (SimMIM), and
    `keep` runs the encoder on a subset of the patch tokens, gathered with their position
    embeddings (MAE). The parameters are the same with or without them.
"""
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fm_adapt.models import activations
from fm_adapt.models import posemb_resize

Array = jax.Array

# Size name -> (width, depth, mlp_dim, num_heads). Reference: Table 2 of arXiv:2106.04560;
# 'mu' is a tiny model for tests and smoke runs.
SIZES: dict[str, tuple[int, int, int, int]] = {
    'mu': (32, 2, 64, 2),
    'Ti': (192, 12, 768, 3),
    'S': (384, 12, 1536, 6),
    'M': (512, 12, 2048, 8),
    'B': (768, 12, 3072, 12),
    'L': (1024, 24, 4096, 16),
    'H': (1280, 32, 5120, 16),
}
POOL_TYPES = ('tok', 'gap')
POSEMB_TYPES = ('learn', 'sincos2d')
LN_EPSILON = 1e-6


def quick_gelu(x: Array) -> Array:
  """OpenAI CLIP's GELU approximation, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


MLP_ACTIVATIONS = {'gelu': activations.gelu, 'quick_gelu': quick_gelu}


def decode_variant(variant: str) -> dict[str, int]:
  """Decodes a variant string such as 'B/16' into model dimensions.

  Args:
    variant: '<size>/<patch>' with size in SIZES ('mu', 'Ti', 'S', 'M', 'B', 'L', 'H') and a
      positive integer patch size.

  Returns:
    A dict with keys width, depth, mlp_dim, num_heads and patch_size.

  Raises:
    ValueError: for a malformed string or an unknown size.
  """
  match = re.fullmatch(r'([A-Za-z]+)/(\d+)', str(variant))
  if match is None:
    raise ValueError(f"ViT variant must look like 'B/16' (size/patch), got {variant!r}; "
                     f'valid sizes: {list(SIZES)}.')
  size, patch = match.group(1), int(match.group(2))
  if size not in SIZES:
    raise ValueError(f'Unknown ViT size {size!r} in variant {variant!r}; '
                     f'valid sizes: {list(SIZES)}.')
  if patch <= 0:
    raise ValueError(f'Patch size must be positive, got {patch} in {variant!r}.')
  width, depth, mlp_dim, num_heads = SIZES[size]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
              patch_size=patch)


def posemb_sincos_2d(h: int, w: int, width: int, temperature: float = 10_000.) -> Array:
  """Fixed 2-D sine-cosine position embedding (MoCo v3), shape [1, h*w, width]."""
  if width % 4:
    raise ValueError(f'sincos2d position embedding needs width % 4 == 0, got {width}.')
  y, x = np.mgrid[:h, :w]
  omega = np.arange(width // 4) / max(width // 4 - 1, 1)
  omega = 1. / (temperature**omega)
  y = np.einsum('m,d->md', y.flatten(), omega)
  x = np.einsum('m,d->md', x.flatten(), omega)
  pe = np.concatenate([np.sin(x), np.cos(x), np.sin(y), np.cos(y)], axis=1)
  return jnp.asarray(pe, jnp.float32)[None]


class DotProductAttention(nn.Module):
  """softmax(q k^T / sqrt(d)) v; a module of its own (no parameters) so that its call has a path.

  Transforms that change the attention map itself (embedded prompt tuning) intercept this call.
  """

  def __call__(self, q: Array, k: Array, v: Array) -> Array:
    """Attends with queries, keys and values [B, T, H, d]; returns [B, T, H, d]."""
    return jax.nn.dot_product_attention(q, k, v)  # Scale 1/sqrt(d).


class Attention(nn.Module):
  """Multi-head self-attention with separate [D, D] query/key/value/out kernels.

  Attributes:
    num_heads: number of attention heads; must divide the token width.
    dtype: compute dtype.
  """
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Applies self-attention to tokens x of shape [B, T, D]."""
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'Width {d} is not divisible by num_heads={self.num_heads}.')
    dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name,
                                  kernel_init=nn.initializers.xavier_uniform())
    heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    q, k, v = (heads(dense(name)(x)) for name in ('query', 'key', 'value'))
    y = DotProductAttention(name='core')(q, k, v)
    return dense('out')(y.reshape(b, t, d))


class MlpBlock(nn.Module):
  """Transformer feed-forward block: fc1 -> activation -> dropout -> fc2.

  Attributes:
    mlp_dim: hidden width.
    dropout: dropout rate after the activation.
    act: a key of MLP_ACTIVATIONS ('gelu' exact erf, 'quick_gelu' as OpenAI CLIP).
    dtype: compute dtype.
  """
  mlp_dim: int
  dropout: float = 0.0
  act: str = 'gelu'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """Applies the MLP to tokens x of shape [B, T, D]."""
    inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype)
    y = nn.Dense(self.mlp_dim, name='fc1', **inits)(x)
    y = MLP_ACTIVATIONS[self.act](y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return nn.Dense(x.shape[-1], name='fc2', **inits)(y)


class LayerScale(nn.Module):
  """Per-channel scale of a residual branch (CaiT; DINOv2, open_clip `ls_init_value`).

  Attributes:
    init_value: the initial value of every channel's scale.
  """
  init_value: float

  @nn.compact
  def __call__(self, x: Array) -> Array:
    """Scales tokens x [B, T, D] by the parameter `scale` [D]."""
    scale = self.param('scale', nn.initializers.constant(self.init_value), (x.shape[-1],),
                       jnp.float32)
    return x * scale.astype(x.dtype)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + drop_attn(ls_attn(attn(ln_attn(x)))), then the MLP alike.

  Each residual branch ends in its own (parameter-free) dropout module, so its output has a
  module path of its own (`drop_attn`, `drop_mlp`). Without `layerscale` there are no
  `ls_attn` / `ls_mlp` modules and the branch is x + drop_attn(attn(ln_attn(x))).

  Attributes:
    mlp_dim: hidden width of the MLP.
    num_heads: number of attention heads.
    dropout: dropout rate on each residual branch (and inside the MLP).
    layerscale: initial LayerScale value, or None for no LayerScale.
    mlp_act: a key of MLP_ACTIVATIONS.
    ln_epsilon: LayerNorm epsilon.
    dtype: compute dtype.
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  layerscale: float | None = None
  mlp_act: str = 'gelu'
  ln_epsilon: float = LN_EPSILON
  dtype: Any = jnp.float32

  def setup(self):
    norm = lambda name: nn.LayerNorm(epsilon=self.ln_epsilon, dtype=self.dtype, name=name)
    self.ln_attn = norm('ln_attn')
    self.attn = Attention(num_heads=self.num_heads, dtype=self.dtype, name='attn')
    self.drop_attn = nn.Dropout(rate=self.dropout, name='drop_attn')
    self.ln_mlp = norm('ln_mlp')
    self.mlp = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, act=self.mlp_act,
                        dtype=self.dtype, name='mlp')
    self.drop_mlp = nn.Dropout(rate=self.dropout, name='drop_mlp')
    if self.layerscale is not None:
      self.ls_attn = LayerScale(self.layerscale, name='ls_attn')
      self.ls_mlp = LayerScale(self.layerscale, name='ls_mlp')

  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """Applies the block to tokens x of shape [B, T, D]."""
    ls_attn, ls_mlp = ((self.ls_attn, self.ls_mlp) if self.layerscale is not None
                       else (lambda y: y, lambda y: y))
    x = x + self.drop_attn(ls_attn(self.attn(self.ln_attn(x))), deterministic)
    return x + self.drop_mlp(ls_mlp(self.mlp(self.ln_mlp(x), deterministic)), deterministic)


class Encoder(nn.Module):
  """A stack of `Encoder1DBlock`s named block_{i}, followed by the final LayerNorm `norm`.

  Attributes:
    depth: number of blocks.
    mlp_dim: hidden width of each MLP.
    num_heads: number of attention heads.
    dropout: dropout rate inside the blocks.
    dtype: compute dtype.
    remat: rematerialize each block in the backward pass (saves memory, costs compute).
    layerscale: initial LayerScale value of every block, or None.
    mlp_act: a key of MLP_ACTIVATIONS.
    ln_epsilon: LayerNorm epsilon.
    final_norm: end with the LayerNorm `norm` (False: the tokens leave un-normalised).
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  layerscale: float | None = None
  mlp_act: str = 'gelu'
  ln_epsilon: float = LN_EPSILON
  final_norm: bool = True

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """Applies the blocks and the final norm to tokens x [B, T, D] (deterministic: no dropout)."""
    block_cls = Encoder1DBlock
    if self.remat:  # Argument 0 is the module itself, so `deterministic` is argument 2.
      # prevent_cse stays True (the default): outside a scan, XLA would otherwise merge the
      # recomputation with the forward pass and keep the activations after all.
      block_cls = nn.remat(Encoder1DBlock, static_argnums=(2,))
    for i in range(self.depth):
      x = block_cls(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                    layerscale=self.layerscale, mlp_act=self.mlp_act,
                    ln_epsilon=self.ln_epsilon, dtype=self.dtype, name=f'block_{i}'
                    )(x, deterministic)
    if not self.final_norm:
      return x
    return nn.LayerNorm(epsilon=self.ln_epsilon, dtype=self.dtype, name='norm')(x)


def replace_masked(tokens: Array, patch_mask: Array, mask_token: Array | None) -> Array:
  """Tokens [B, N, D] with the rows where patch_mask [B, N] is True replaced by mask_token.

  Raises:
    ValueError: no mask token, or a patch_mask whose shape is not [B, N].
  """
  if mask_token is None:
    raise ValueError('patch_mask needs a mask_token to put in place of the masked patches.')
  if patch_mask.shape != tokens.shape[:2]:
    raise ValueError(f'patch_mask must be [batch, patches] = {tokens.shape[:2]}, got '
                     f'{patch_mask.shape}: build it on the patch grid of the image.')
  token = jnp.asarray(mask_token).astype(tokens.dtype)
  return jnp.where(patch_mask[..., None], token, tokens)


def gather_tokens(tokens: Array, keep: Array) -> Array:
  """tokens [B, N, D] at the indices keep [B, K] -> [B, K, D].

  Raises:
    ValueError: a keep that is not an integer [B, K] array.
  """
  if keep.ndim != 2 or keep.shape[0] != tokens.shape[0] or not jnp.issubdtype(
      keep.dtype, jnp.integer):
    raise ValueError(f'keep must be integer patch indices [batch={tokens.shape[0]}, K], got '
                     f'{keep.dtype} {keep.shape}.')
  return jnp.take_along_axis(tokens, keep[..., None], axis=1)


def _as_grid(grid: int | tuple[int, int] | list[int]) -> tuple[int, int]:
  if isinstance(grid, int):
    return grid, grid
  if len(grid) != 2:
    raise ValueError(f'posemb_grid must be an int or (rows, cols), got {grid!r}.')
  return int(grid[0]), int(grid[1])


class Model(nn.Module):
  """ViT classifier (or feature extractor when num_classes is None or 0).

  The defaults are the original ViT (big_vision / timm `vit_*_patch16_224`); the other fields
  configure the foundation-model families (`fm_adapt.weights.zoo` sets them per model):
  DINOv2 (layerscale, num_registers, patch 14, posemb_grid with posemb_resize='dinov2'),
  MAE / RETFound (pool_type='gap', class_token=True, fc_norm=True), CLIP towers (pre_norm,
  patch_bias=False, mlp_act='quick_gelu', ln_epsilon=1e-5, proj_dim); class_posemb for the
  families whose checkpoints give the class token a position row.

  Attributes:
    num_classes: size of the head; None or 0 gives no head (logits = pre_logits).
    variant: '<size>/<patch>', see `decode_variant`.
    pool_type: 'tok' (class token) or 'gap' (mean of the patch tokens; never cls/registers).
    posemb: 'learn' (parameter `pos_embedding`) or 'sincos2d' (fixed, no parameter).
    dropout: dropout rate after the embedding and inside the blocks.
    head_zeroinit: initialize the head kernel to zeros.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    remat: rematerialize each encoder block (nn.remat) to save activation memory.
    class_token: whether there is a class token `cls`; None: exactly when pool_type == 'tok'.
    class_posemb: give the class token its own position embedding `cls_pos_embedding` [1,1,D]
      (added to `cls`, never resized), as timm / DINOv2 / MAE / CLIP have it; needs a class
      token. False: none (big_vision; an importer folds a checkpoint's class row into `cls`).
    num_registers: register tokens after the class token (DINOv2 with registers).
    layerscale: initial LayerScale value (DINOv2: 1e-5; open_clip ls_init_value), or None.
    pre_norm: LayerNorm `ln_pre` on all tokens before the encoder (CLIP).
    patch_bias: whether the patch embedding has a bias (CLIP's has none).
    mlp_act: 'gelu' (exact) or 'quick_gelu' (OpenAI CLIP).
    ln_epsilon: epsilon of every LayerNorm.
    fc_norm: normalise the pooled features with `fc_norm` instead of the tokens with
      `encoder/norm` (timm global_pool='avg' / MAE fine-tuning).
    proj_dim: size of the optional bias-free projection `proj` of the pooled features (CLIP's
      image embedding); None for none.
    posemb_grid: the (rows, cols) grid `pos_embedding` is stored at (e.g. 37 for DINOv2 at 518
      px); None: the image's own grid (the parameter then depends on the image size).
    posemb_resize: how `pos_embedding` is resized to the image's grid when they differ, a key
      of `posemb_resize.METHODS`; only used with posemb_grid.
  """
  num_classes: int | None
  variant: str = 'S/16'
  pool_type: str = 'tok'
  posemb: str = 'learn'
  dropout: float = 0.0
  head_zeroinit: bool = True
  dtype: Any = jnp.float32
  remat: bool = False
  class_token: bool | None = None
  class_posemb: bool = False
  num_registers: int = 0
  layerscale: float | None = None
  pre_norm: bool = False
  patch_bias: bool = True
  mlp_act: str = 'gelu'
  ln_epsilon: float = LN_EPSILON
  fc_norm: bool = False
  proj_dim: int | None = None
  posemb_grid: Any = None
  posemb_resize: str = 'bicubic_antialias'

  @property
  def has_class_token(self) -> bool:
    """Whether the model has the class token `cls`."""
    return self.pool_type == 'tok' if self.class_token is None else bool(self.class_token)

  def _check_config(self) -> None:
    """Raises on invalid field values."""
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f'Unknown pool_type {self.pool_type!r}; valid: {list(POOL_TYPES)}.')
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f'Unknown posemb {self.posemb!r}; valid: {list(POSEMB_TYPES)}.')
    if self.pool_type == 'tok' and not self.has_class_token:
      raise ValueError("pool_type='tok' pools the class token, but class_token=False; use "
                       "pool_type='gap' or class_token=True.")
    if self.class_posemb and not self.has_class_token:
      raise ValueError("class_posemb=True is the position embedding of the class token, but "
                       "the model has none (class_token=False, or pool_type='gap' without "
                       "class_token=True); set class_token=True or class_posemb=False.")
    if self.mlp_act not in MLP_ACTIVATIONS:
      raise ValueError(f'Unknown mlp_act {self.mlp_act!r}; valid: {list(MLP_ACTIVATIONS)}.')
    if self.posemb_resize not in posemb_resize.METHODS:
      raise ValueError(f'Unknown posemb_resize {self.posemb_resize!r}; valid: '
                       f'{list(posemb_resize.METHODS)}.')
    if self.num_registers < 0:
      raise ValueError(f'num_registers must be >= 0, got {self.num_registers}.')
    if self.posemb_grid is not None and self.posemb != 'learn':
      raise ValueError("posemb_grid is the grid of a learned position embedding; it needs "
                       f"posemb='learn', got posemb={self.posemb!r}.")

  def _embed(self, image: Array, patch: int, width: int) -> tuple[Array, tuple[int, int]]:
    """Patch-embeds image [B, H, W, C] into tokens [B, N, D]; returns them and the grid."""
    if image.ndim != 4:
      raise ValueError(f'ViT expects images [B, H, W, C], got shape {image.shape}.')
    _, h, w, _ = image.shape
    if h % patch or w % patch:
      raise ValueError(f'Image size {h}x{w} is not divisible by the patch size {patch} '
                       f'of variant {self.variant!r}.')
    x = nn.Conv(width, (patch, patch), strides=(patch, patch), padding='VALID',
                use_bias=self.patch_bias, dtype=self.dtype, name='embedding')(image)
    b, gh, gw, d = x.shape
    return x.reshape(b, gh * gw, d), (gh, gw)

  def _posemb(self, grid: tuple[int, int], width: int) -> Array:
    """Position embedding [1, N, D] for a patch grid."""
    if self.posemb == 'sincos2d':
      return posemb_sincos_2d(*grid, width)
    stored = grid if self.posemb_grid is None else _as_grid(self.posemb_grid)
    pos = self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                     (1, stored[0] * stored[1], width), jnp.float32)
    return posemb_resize.resize(pos, stored, grid, self.posemb_resize)

  def _prefix_tokens(self, batch: int, width: int) -> list[Array]:
    """[cls (+ cls_pos_embedding)?, registers?] each broadcast to [B, ., D] (float32)."""
    tokens = []
    if self.has_class_token:
      cls = self.param('cls', nn.initializers.zeros, (1, 1, width), jnp.float32)
      if self.class_posemb:
        cls = cls + self.param('cls_pos_embedding', nn.initializers.normal(stddev=0.02),
                               (1, 1, width), jnp.float32)
      tokens.append(cls)
    if self.num_registers:
      tokens.append(self.param('registers', nn.initializers.normal(stddev=0.02),
                               (1, self.num_registers, width), jnp.float32))
    return [jnp.broadcast_to(t, (batch, t.shape[1], width)) for t in tokens]

  def _pool(self, encoded: Array, patch_tokens: Array, out: dict[str, Array]) -> Array:
    """Pooled features (class token or patch mean; fc_norm; projection) into out."""
    if self.pool_type == 'tok':
      x = encoded[:, 0]
    else:
      x = jnp.mean(patch_tokens, axis=1)
    if self.fc_norm:
      x = nn.LayerNorm(epsilon=self.ln_epsilon, dtype=self.dtype, name='fc_norm')(x)
    out['pooled'] = x
    if self.proj_dim:
      x = nn.Dense(self.proj_dim, use_bias=False, dtype=self.dtype,
                   kernel_init=nn.initializers.lecun_normal(), name='proj')(x)
    return x

  def _tokens(self, image: Array, out: dict[str, Array], patch_mask: Array | None,
              mask_token: Array | None, keep: Array | None) -> tuple[Array, int]:
    """The encoder's input [B, T, D] (prefix tokens, then the patch tokens it sees) and the
    number of patch tokens in it; fills out['stem'] and out['with_posemb']."""
    cfg = decode_variant(self.variant)
    width = cfg['width']
    x, grid = self._embed(image, cfg['patch_size'], width)
    out['stem'] = x
    if patch_mask is not None:
      x = replace_masked(x, patch_mask, mask_token)
    x = x + self._posemb(grid, width).astype(x.dtype)
    if keep is not None:
      x = gather_tokens(x, keep)
    out['with_posemb'] = x
    prefix = [t.astype(x.dtype) for t in self._prefix_tokens(x.shape[0], width)]
    return jnp.concatenate(prefix + [x], axis=1), x.shape[1]

  def _encode(self, image: Array, train: bool, patch_mask: Array | None = None,
              mask_token: Array | None = None, keep: Array | None = None) -> dict[str, Array]:
    """Runs everything up to the pooled features; returns `out` (see `__call__`)."""
    self._check_config()
    cfg, out = decode_variant(self.variant), {}
    x, num_patches = self._tokens(image, out, patch_mask, mask_token, keep)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    if self.pre_norm:
      x = nn.LayerNorm(epsilon=self.ln_epsilon, dtype=self.dtype, name='ln_pre')(x)
    encoded = out['encoded'] = Encoder(
        depth=cfg['depth'], mlp_dim=cfg['mlp_dim'], num_heads=cfg['num_heads'],
        dropout=self.dropout, dtype=self.dtype, remat=self.remat, layerscale=self.layerscale,
        mlp_act=self.mlp_act, ln_epsilon=self.ln_epsilon, final_norm=not self.fc_norm,
        name='encoder')(x, not train)
    patch_tokens = out['patch_tokens'] = encoded[:, -num_patches:]
    out['pre_logits'] = self._pool(encoded, patch_tokens, out)
    return out

  @nn.compact
  def __call__(self, image: Array, *, train: bool = False, patch_mask: Array | None = None,
               mask_token: Array | None = None, keep: Array | None = None
               ) -> tuple[Array, dict[str, Array]]:
    """Runs the model.

    Args:
      image: float images [B, H, W, C] with H and W divisible by the patch size.
      train: enables dropout (needs a 'dropout' rng when dropout > 0).
      patch_mask: optional bool [B, N], True where the patch embedding is replaced by
        `mask_token` before the position embedding is added (SimMIM-style masked input).
      mask_token: [D] (or broadcastable to [B, N, D]) token for the masked patches; needed
        with `patch_mask`. The model holds no mask token of its own.
      keep: optional int [B, K], the indices of the patches the encoder sees (MAE-style: the
        patch tokens and their position embeddings are gathered, so the encoder's cost falls
        with K); the prefix tokens (class token, registers) are always kept.

    Returns:
      (logits, out) where out holds 'stem' [B,N,D] (patch embeddings before masking and the
      position embedding), 'with_posemb' [B,N',D] (the patch tokens entering, after masking,
      position embedding and `keep`: N' = K with `keep`, else N), 'encoded' [B,T,D] (all
      tokens after the encoder, normalised unless fc_norm), 'patch_tokens' [B,N',D] (the last
      N' of them), 'pooled' [B,D] (class token or patch mean, after fc_norm), 'pre_logits'
      (pooled, projected by `proj` when proj_dim is set) and 'logits'.
    """
    out = self._encode(image, train, patch_mask, mask_token, keep)
    x = out['pre_logits']
    if self.num_classes:
      kernel_init = (nn.initializers.zeros if self.head_zeroinit
                     else nn.initializers.lecun_normal())
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init,
                   name='head')(x)
    logits = out['logits'] = x.astype(jnp.float32)
    return logits, out
