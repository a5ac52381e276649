"""Vision Transformer (ViT) in Flax linen.

Follows the plain ViT of Dosovitskiy et al. (2021) as laid out in big_vision, with parameter
names fixed for checkpoint importers and LoRA selectors:

  embedding/{kernel [p,p,C,D], bias}         patch embedding (VALID conv, stride p)
  cls [1,1,D]                                class token (pool_type='tok' only)
  pos_embedding [1,N,D]                      learned position embedding of the N patches
  encoder/block_{i}/ln_attn/{scale,bias}
  encoder/block_{i}/attn/{query,key,value,out}/{kernel [D,D],bias [D]}
  encoder/block_{i}/ln_mlp/{scale,bias}
  encoder/block_{i}/mlp/{fc1,fc2}/{kernel,bias}
  encoder/norm/{scale,bias}
  head/{kernel,bias}                         only when num_classes is set

Optional adaptation parameters (absent unless configured; see `fm_adapt.adapt.prompts` and
`fm_adapt.adapt.adapters`):

  prompt/shallow [1,n,D] | prompt/deep [L,n,D] | prompt/ept [L,T,n]     prompt=dict(kind=...)
  encoder/block_{i}/adapter_{attn,mlp}/{down,up}/{kernel,bias}          adapter=dict(kind=...)

Conventions worth knowing:
  * Token layout is [cls?, patches...]. VPT prompt tokens are inserted right after the class
    token and removed again after the final norm, so `out['encoded']` always has the layout
    [cls?, patches...]; code that wants the patches takes the *last* N tokens.
  * The position embedding covers only the patch tokens; the class token gets none (as in
    big_vision). timm / the original ViT add a position row to the class token too; since that
    row is a constant added to a learned constant, an importer folds it in exactly:
    `cls = cls + pos_embed[:, :1]`, `pos_embedding = pos_embed[:, 1:]`. Hence a 'tok' model
    here has D fewer parameters than the timm count (e.g. ViT-B/16: 86,566,888 vs 86,567,656).
  * GELU is the exact erf form (`approximate=False`), as in timm / PyTorch `nn.GELU()`.
  * LayerNorm epsilon is 1e-6 (big_vision / timm ViT).
  * Parameters are float32; `dtype` only sets the compute dtype. Logits are returned in float32.
"""
from collections.abc import Mapping
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fm_adapt.adapt import adapters, prompts
from fm_adapt.models import activations

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
}
POOL_TYPES = ('tok', 'gap')
POSEMB_TYPES = ('learn', 'sincos2d')
LN_EPSILON = 1e-6


def decode_variant(variant: str) -> dict[str, int]:
  """Decodes a variant string such as 'B/16' into model dimensions.

  Args:
    variant: '<size>/<patch>' with size in SIZES ('mu', 'Ti', 'S', 'M', 'B', 'L') and a
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


class Attention(nn.Module):
  """Multi-head self-attention with separate [D, D] query/key/value/out kernels.

  Attributes:
    num_heads: number of attention heads; must divide the token width.
    dtype: compute dtype.
  """
  num_heads: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, prompt: Array | None = None) -> Array:
    """Applies self-attention to tokens x of shape [B, T, D].

    Args:
      x: tokens [B, T, D].
      prompt: optional EPT prompt logits [T, n] embedded as extra attention channels (see
        `prompts.ept_attention`); None is plain attention.
    """
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f'Width {d} is not divisible by num_heads={self.num_heads}.')
    dense = lambda name: nn.Dense(d, dtype=self.dtype, name=name,
                                  kernel_init=nn.initializers.xavier_uniform())
    heads = lambda y: y.reshape(b, t, self.num_heads, d // self.num_heads)
    q, k, v = (heads(dense(name)(x)) for name in ('query', 'key', 'value'))
    if prompt is None:
      y = jax.nn.dot_product_attention(q, k, v)  # [B, T, H, D/H], scale 1/sqrt(D/H).
    else:
      y = prompts.ept_attention(q, k, v, prompt)
    return dense('out')(y.reshape(b, t, d))


class MlpBlock(nn.Module):
  """Transformer feed-forward block: fc1 -> exact GELU -> dropout -> fc2.

  Attributes:
    mlp_dim: hidden width.
    dropout: dropout rate after the activation.
    dtype: compute dtype.
  """
  mlp_dim: int
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True) -> Array:
    """Applies the MLP to tokens x of shape [B, T, D]."""
    inits = dict(kernel_init=nn.initializers.xavier_uniform(),
                 bias_init=nn.initializers.normal(stddev=1e-6), dtype=self.dtype)
    y = nn.Dense(self.mlp_dim, name='fc1', **inits)(x)
    y = activations.gelu(y)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return nn.Dense(x.shape[-1], name='fc2', **inits)(y)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block: x + attn(ln_attn(x)), then x + mlp(ln_mlp(x)).

  Each residual branch is computed by its own method; bottleneck adapters (`adapter`) are added
  on the branch output before the residual add.

  Attributes:
    mlp_dim: hidden width of the MLP.
    num_heads: number of attention heads.
    dropout: dropout rate on each residual branch (and inside the MLP).
    dtype: compute dtype.
    adapter: a config checked by `adapters.check_vit_config`, or None.
  """
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  adapter: Mapping[str, Any] | None = None

  def setup(self):
    norm = lambda name: nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name=name)
    self.ln_attn = norm('ln_attn')
    self.attn = Attention(num_heads=self.num_heads, dtype=self.dtype, name='attn')
    self.ln_mlp = norm('ln_mlp')
    self.mlp = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                        name='mlp')
    self.drop = nn.Dropout(rate=self.dropout)
    where = self.adapter['where'] if self.adapter else ()
    make = lambda name: adapters.Bottleneck(self.adapter['dim'], self.adapter['act'],
                                            dtype=self.dtype, name=name)
    self.adapter_attn = make('adapter_attn') if 'attn' in where else None
    self.adapter_mlp = make('adapter_mlp') if 'mlp' in where else None

  def attn_branch(self, x: Array, deterministic: bool, prompt: Array | None = None) -> Array:
    """The attention residual branch (without the residual add); prompt: EPT logits [T, n]."""
    return self.drop(self.attn(self.ln_attn(x), prompt), deterministic)

  def mlp_branch(self, x: Array, deterministic: bool) -> Array:
    """The MLP residual branch (without the residual add)."""
    return self.drop(self.mlp(self.ln_mlp(x), deterministic), deterministic)

  def adapted(self, adapter: nn.Module | None, x: Array, y: Array) -> Array:
    """Adds the adapter to branch output y (x: the branch input, read by 'parallel')."""
    if adapter is None:
      return y
    source = y if self.adapter['kind'] == 'sequential' else x
    return y + self.adapter['scale'] * adapter(source)

  def __call__(self, x: Array, deterministic: bool = True,
               prompt: Array | None = None) -> Array:
    """Applies the block to tokens x of shape [B, T, D] (prompt: EPT logits [T, n])."""
    x = x + self.adapted(self.adapter_attn, x, self.attn_branch(x, deterministic, prompt))
    return x + self.adapted(self.adapter_mlp, x, self.mlp_branch(x, deterministic))


class Encoder(nn.Module):
  """A stack of `Encoder1DBlock`s named block_{i}, followed by the final LayerNorm `norm`.

  Attributes:
    depth: number of blocks.
    mlp_dim: hidden width of each MLP.
    num_heads: number of attention heads.
    dropout: dropout rate inside the blocks.
    dtype: compute dtype.
    remat: rematerialize each block in the backward pass (saves memory, costs compute).
    adapter: a config checked by `adapters.check_vit_config`, or None.
  """
  depth: int
  mlp_dim: int
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  remat: bool = False
  adapter: Mapping[str, Any] | None = None

  @nn.compact
  def __call__(self, x: Array, deterministic: bool = True, *,
               deep_prompts: Array | None = None, ept_prompts: Array | None = None,
               num_prefix: int = 0) -> Array:
    """Applies the blocks and the final norm to tokens x [B, T, D].

    Args:
      x: tokens [B, T, D]; with VPT-deep, block 0's prompts are already in place.
      deterministic: disables dropout.
      deep_prompts: VPT-deep tokens [B, L, n, D]; before each block i > 0 they replace
        x[:, num_prefix:num_prefix + n].
      ept_prompts: EPT prompt logits [L, T, n], row i for block i.
      num_prefix: number of tokens before the prompts (1 with a class token).
    """
    block_cls = Encoder1DBlock
    if self.remat:  # Argument 0 is the module itself, so `deterministic` is argument 2.
      block_cls = nn.remat(Encoder1DBlock, prevent_cse=False, static_argnums=(2,))
    for i in range(self.depth):
      if deep_prompts is not None and i > 0:
        x = prompts.replace(x, deep_prompts[:, i], num_prefix)
      args = (x, deterministic) if ept_prompts is None else (x, deterministic, ept_prompts[i])
      x = block_cls(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
                    dtype=self.dtype, adapter=self.adapter, name=f'block_{i}')(*args)
    return nn.LayerNorm(epsilon=LN_EPSILON, dtype=self.dtype, name='norm')(x)


class Model(nn.Module):
  """ViT classifier (or feature extractor when num_classes is None or 0).

  Attributes:
    num_classes: size of the head; None or 0 gives no head (logits = pre_logits).
    variant: '<size>/<patch>', see `decode_variant`.
    pool_type: 'tok' (class token) or 'gap' (mean of the patch tokens).
    posemb: 'learn' (parameter `pos_embedding`) or 'sincos2d' (fixed, no parameter).
    dropout: dropout rate after the embedding and inside the blocks.
    head_zeroinit: initialize the head kernel to zeros.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters stay float32.
    remat: rematerialize each encoder block (nn.remat) to save activation memory.
    prompt: prompt tokens, e.g. dict(kind='vpt_deep', num_tokens=10); kinds 'vpt_shallow',
      'vpt_deep', 'ept' (see `fm_adapt.adapt.prompts`). None or num_tokens=0: no prompts.
    adapter: bottleneck adapters, e.g. dict(kind='sequential', dim=64, where=('attn', 'mlp'));
      kinds 'sequential' (Houlsby) and 'parallel' (He et al.), see `fm_adapt.adapt.adapters`.
  """
  num_classes: int | None
  variant: str = 'S/16'
  pool_type: str = 'tok'
  posemb: str = 'learn'
  dropout: float = 0.0
  head_zeroinit: bool = True
  dtype: Any = jnp.float32
  remat: bool = False
  prompt: Mapping[str, Any] | None = None
  adapter: Mapping[str, Any] | None = None

  def _check_config(self) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """Raises on invalid field values; returns the checked (prompt, adapter) configs."""
    if self.pool_type not in POOL_TYPES:
      raise ValueError(f'Unknown pool_type {self.pool_type!r}; valid: {list(POOL_TYPES)}.')
    if self.posemb not in POSEMB_TYPES:
      raise ValueError(f'Unknown posemb {self.posemb!r}; valid: {list(POSEMB_TYPES)}.')
    adapter = None if self.adapter is None else adapters.check_vit_config(self.adapter)
    return prompts.check_config(self.prompt), adapter

  def _embed(self, image: Array, patch: int, width: int) -> tuple[Array, tuple[int, int]]:
    """Patch-embeds image [B, H, W, C] into tokens [B, N, D]; returns them and the grid."""
    if image.ndim != 4:
      raise ValueError(f'ViT expects images [B, H, W, C], got shape {image.shape}.')
    _, h, w, _ = image.shape
    if h % patch or w % patch:
      raise ValueError(f'Image size {h}x{w} is not divisible by the patch size {patch} '
                       f'of variant {self.variant!r}.')
    x = nn.Conv(width, (patch, patch), strides=(patch, patch), padding='VALID',
                dtype=self.dtype, name='embedding')(image)
    b, gh, gw, d = x.shape
    return x.reshape(b, gh * gw, d), (gh, gw)

  def _posemb(self, grid: tuple[int, int], width: int) -> Array:
    """Position embedding [1, N, D] for a patch grid."""
    if self.posemb == 'sincos2d':
      return posemb_sincos_2d(*grid, width)
    return self.param('pos_embedding', nn.initializers.normal(stddev=0.02),
                      (1, grid[0] * grid[1], width), jnp.float32)

  def _add_prompts(self, cfg: Mapping[str, Any], x: Array, fan_in: int, num_prefix: int,
                   depth: int, train: bool) -> tuple[Array, Array | None, Array | None]:
    """Creates the prompt parameters and inserts VPT tokens into x [B, T, D].

    Returns:
      (x, deep tokens [B, L, n, D] or None, EPT logits [L, T, n] or None).
    """
    b, t, d = x.shape
    params = prompts.PromptParams(cfg['kind'], cfg['num_tokens'], depth, d, t, fan_in,
                                  name='prompt')()
    if cfg['kind'] == 'ept':
      return x, None, params
    tokens = jnp.broadcast_to(params.astype(x.dtype)[None], (b, *params.shape))
    tokens = nn.Dropout(rate=cfg['dropout'], name='prompt_dropout')(tokens, not train)
    x = prompts.insert(x, tokens[:, 0], num_prefix)
    return x, (tokens if cfg['kind'] == 'vpt_deep' else None), None

  @nn.compact
  def __call__(self, image: Array, *, train: bool = False) -> tuple[Array, dict[str, Array]]:
    """Runs the model.

    Args:
      image: float images [B, H, W, C] with H and W divisible by the patch size.
      train: enables dropout (needs a 'dropout' rng when dropout > 0).

    Returns:
      (logits, out) where out holds 'stem' [B,N,D] (patch embeddings before the position
      embedding), 'with_posemb' [B,N,D], 'encoded' [B,T,D] (all tokens after the final norm),
      'patch_tokens' [B,N,D] (the last N of them), 'pre_logits' [B,D] and 'logits'.
    """
    prompt_cfg, adapter_cfg = self._check_config()
    cfg = decode_variant(self.variant)
    width, out = cfg['width'], {}
    x, grid = self._embed(image, cfg['patch_size'], width)
    num_patches = x.shape[1]
    out['stem'] = x
    x = out['with_posemb'] = x + self._posemb(grid, width).astype(x.dtype)
    if self.pool_type == 'tok':
      cls = self.param('cls', nn.initializers.zeros, (1, 1, width), jnp.float32)
      cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, width))
      x = jnp.concatenate([cls, x], axis=1)
    x = nn.Dropout(rate=self.dropout)(x, not train)
    num_prefix, deep, ept = int(self.pool_type == 'tok'), None, None
    if prompt_cfg:  # Prompt tokens go between the class token and the patches.
      fan_in = cfg['patch_size'] ** 2 * image.shape[-1]
      x, deep, ept = self._add_prompts(prompt_cfg, x, fan_in, num_prefix, cfg['depth'], train)
    encoded = Encoder(depth=cfg['depth'], mlp_dim=cfg['mlp_dim'],
                      num_heads=cfg['num_heads'], dropout=self.dropout, dtype=self.dtype,
                      remat=self.remat, adapter=adapter_cfg, name='encoder')(
                          x, not train, deep_prompts=deep, ept_prompts=ept,
                          num_prefix=num_prefix)
    if prompt_cfg and prompt_cfg['kind'] != 'ept':
      encoded = prompts.remove(encoded, num_prefix, prompt_cfg['num_tokens'])
    out['encoded'] = encoded
    patch_tokens = out['patch_tokens'] = encoded[:, -num_patches:]
    if self.pool_type == 'tok':
      x = out['pre_logits'] = encoded[:, 0]
    else:
      x = out['pre_logits'] = jnp.mean(patch_tokens, axis=1)
    if self.num_classes:
      kernel_init = (nn.initializers.zeros if self.head_zeroinit
                     else nn.initializers.lecun_normal())
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=kernel_init,
                   name='head')(x)
    logits = out['logits'] = x.astype(jnp.float32)
    return logits, out
