"""ResNet-18/34/50 in Flax linen, laid out like torchvision's ResNet (v1.5).

Parameter names (stages and blocks count from 0):

  stem/conv/kernel, stem/bn/{scale,bias}
  stage_{s}/block_{b}/{conv1,bn1,conv2,bn2}            BasicBlock (depth 18, 34)
  stage_{s}/block_{b}/{conv1,bn1,conv2,bn2,conv3,bn3}  Bottleneck (depth 50), stride on conv2
  stage_{s}/block_{b}/{proj_conv,proj_bn}              1x1 projection shortcut, when needed
  head/{kernel,bias}                                    only when num_classes > 0

Convolutions have no bias and use explicit symmetric padding k // 2, so the arithmetic matches
PyTorch (and imported torchvision weights) also for stride 2. BatchNorm uses momentum 0.9 and
epsilon 1e-5 (PyTorch's momentum=0.1 in the other convention) and keeps its running statistics
in the 'batch_stats' collection: call `apply(..., train=True, mutable=['batch_stats'])` in
training. Parameters are float32; `dtype` sets the compute dtype; logits are float32.

`mask` ([B] bool, True for real examples) keeps padded rows of a batch out of the BatchNorm
statistics, so a padded last batch trains exactly as the short batch it stands for.

Initialisation (`weight_init`): 'torchvision' is torchvision's ResNet (convs kaiming-normal fan-out,
the linear head PyTorch's default); 'pytorch' is PyTorch's layer defaults everywhere
(kaiming-uniform with a = sqrt(5), i.e. U(+-1/sqrt(fan_in)), for convs and the head, the head
bias U(+-1/sqrt(fan_in))), which is what the MedMNIST v2 28-px ResNets get (their `models.py`
sets no initialiser). BatchNorm starts at scale 1, bias 0 in both.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from fm_adapt.models import batch_norm
from fm_adapt.models import conv

Array = jax.Array

STEMS = ('cifar', 'imagenet')
# PyTorch's default for Conv2d / Linear weights: kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)).
_PYTORCH_DEFAULT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')
# Conv init: torchvision's kaiming normal, fan_out, ReLU gain; or PyTorch's default.
CONV_INITS = {'torchvision': nn.initializers.variance_scaling(2.0, 'fan_out', 'normal'),
              'pytorch': _PYTORCH_DEFAULT}


def _pytorch_bias_init(fan_in: int):
  """PyTorch's Linear bias default, U(+-1/sqrt(fan_in))."""
  bound = 1.0 / fan_in**0.5
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound, bound)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str,
          conv_impl: str = 'auto', weight_init: str = 'torchvision') -> conv.Conv:
  """Bias-free conv with PyTorch-style symmetric padding (an nn.Conv, see `conv.Conv`)."""
  pad = kernel // 2
  return conv.Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)), use_bias=False, dtype=dtype,
                   kernel_init=CONV_INITS[weight_init], name=name, conv_impl=conv_impl)


def _norm(train: bool, dtype: Any, name: str, zero_scale: bool = False) -> nn.BatchNorm:
  """BatchNorm with torchvision's statistics (momentum 0.9 here, eps 1e-5)."""
  scale_init = nn.initializers.zeros if zero_scale else nn.initializers.ones
  return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                      dtype=dtype, scale_init=scale_init, name=name)


def _masked_norm(train: bool, dtype: Any, mask: Array | None, name: str,
                 zero_scale: bool = False):
  """`_norm` as a function of x that keeps the rows where `mask` is False out of the statistics."""
  bn = _norm(train, dtype, name, zero_scale)
  return lambda x: batch_norm.normalize(bn, x, mask)


class BasicBlock(nn.Module):
  """Two 3x3 convs with a residual connection (ResNet-18/34).

  Attributes:
    features: output channels.
    stride: stride of conv1 (and the projection).
    zero_init_residual: initialize bn2's scale to zero so the block starts as identity.
    dtype: compute dtype.
    conv_impl: convolution implementation, see `conv.Conv`.
    weight_init: 'torchvision' or 'pytorch' conv initialisation, see the module docstring.
  """
  features: int
  stride: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  weight_init: str = 'torchvision'

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Array | None = None) -> Array:
    """Applies the block to x [B, H, W, C]; `mask` [B] marks the real rows (see `batch_norm`)."""
    norm = functools.partial(_masked_norm, train, self.dtype, mask)
    make_conv = functools.partial(_conv, dtype=self.dtype, conv_impl=self.conv_impl,
                                  weight_init=self.weight_init)
    y = nn.relu(norm('bn1')(make_conv(self.features, 3, self.stride, name='conv1')(x)))
    y = make_conv(self.features, 3, 1, name='conv2')(y)
    y = norm('bn2', zero_scale=self.zero_init_residual)(y)
    return nn.relu(y + _shortcut(x, self.features, self.stride, norm, make_conv))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with a residual connection (ResNet-50).

  Attributes:
    features: bottleneck channels; the block outputs 4 * features.
    stride: stride of conv2 (torchvision v1.5) and of the projection.
    zero_init_residual: initialize bn3's scale to zero so the block starts as identity.
    dtype: compute dtype.
    conv_impl: convolution implementation, see `conv.Conv`.
    weight_init: 'torchvision' or 'pytorch' conv initialisation, see the module docstring.
  """
  features: int
  stride: int = 1
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  weight_init: str = 'torchvision'

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Array | None = None) -> Array:
    """Applies the block to x [B, H, W, C]; `mask` [B] marks the real rows (see `batch_norm`)."""
    norm = functools.partial(_masked_norm, train, self.dtype, mask)
    make_conv = functools.partial(_conv, dtype=self.dtype, conv_impl=self.conv_impl,
                                  weight_init=self.weight_init)
    out_features = 4 * self.features
    y = nn.relu(norm('bn1')(make_conv(self.features, 1, 1, name='conv1')(x)))
    y = nn.relu(norm('bn2')(make_conv(self.features, 3, self.stride, name='conv2')(y)))
    y = make_conv(out_features, 1, 1, name='conv3')(y)
    y = norm('bn3', zero_scale=self.zero_init_residual)(y)
    return nn.relu(y + _shortcut(x, out_features, self.stride, norm, make_conv))


def _shortcut(x: Array, features: int, stride: int, norm, make_conv) -> Array:
  """Identity, or a 1x1 strided projection + BN when the shape changes.

  Called from inside a block's compact `__call__`, so the submodules belong to that block.
  `make_conv` is the block's `_conv` with dtype and conv_impl bound.
  """
  if stride == 1 and x.shape[-1] == features:
    return x
  return norm('proj_bn')(make_conv(features, 1, stride, name='proj_conv')(x))


# depth -> (block class, blocks per stage).
DEPTHS: dict[int, tuple[type[nn.Module], tuple[int, ...]]] = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
}


class Stem(nn.Module):
  """conv + BN + ReLU (+ max-pool for the ImageNet stem).

  Attributes:
    kind: 'cifar' (3x3 stride 1, no pool) or 'imagenet' (7x7 stride 2, 3x3/2 max-pool).
    width: output channels.
    dtype: compute dtype.
    conv_impl: convolution implementation, see `conv.Conv`.
    weight_init: 'torchvision' or 'pytorch' conv initialisation, see the module docstring.
  """
  kind: str
  width: int
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  weight_init: str = 'torchvision'

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Array | None = None) -> Array:
    """Applies the stem to images x [B, H, W, C]; `mask` [B] marks the real rows."""
    kernel, stride = (3, 1) if self.kind == 'cifar' else (7, 2)
    x = _conv(self.width, kernel, stride, self.dtype, 'conv', self.conv_impl,
              self.weight_init)(x)
    x = nn.relu(_masked_norm(train, self.dtype, mask, 'bn')(x))
    if self.kind == 'imagenet':
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    return x


class Stage(nn.Module):
  """A run of residual blocks named block_{b}; the first one may downsample.

  Attributes:
    block_cls: BasicBlock or Bottleneck.
    num_blocks: number of blocks.
    features: channels of the blocks (before the bottleneck expansion).
    stride: stride of the first block.
    zero_init_residual: see the block classes.
    dtype: compute dtype.
    conv_impl: convolution implementation, see `conv.Conv`.
    weight_init: 'torchvision' or 'pytorch' conv initialisation, see the module docstring.
    remat: rematerialize each block in the backward pass (`nn.remat`).
  """
  block_cls: type[nn.Module]
  num_blocks: int
  features: int
  stride: int
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  weight_init: str = 'torchvision'
  remat: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False, mask: Array | None = None) -> Array:
    """Applies the blocks to x [B, H, W, C]; `mask` [B] marks the real rows."""
    block_cls = self.block_cls
    if self.remat:  # Argument 0 is the module itself, so `train` is argument 2.
      block_cls = nn.remat(block_cls, static_argnums=(2,))
    for b in range(self.num_blocks):
      x = block_cls(features=self.features, stride=self.stride if b == 0 else 1,
                    zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                    conv_impl=self.conv_impl, weight_init=self.weight_init,
                    name=f'block_{b}')(x, train, mask)
    return x


class Model(nn.Module):
  """ResNet classifier (or feature extractor when num_classes is 0).

  Attributes:
    num_classes: size of the head; 0 gives no head (logits = pre_logits).
    depth: 18, 34 or 50.
    stem: 'cifar' (3x3 stride 1, no max-pool; the MedMNIST v2 ResNet for 28 px) or
      'imagenet' (7x7 stride 2 + 3x3 stride-2 max-pool; for 224 px).
    width: channels of the stem and the first stage; stage s has width * 2**s.
    zero_init_residual: zero-init the last BN scale of every residual block.
    dtype: compute dtype (e.g. jnp.bfloat16); parameters and BN statistics stay float32.
    conv_impl: convolution implementation of every conv: 'auto' (fast weight gradients on
      CPU, plain XLA elsewhere), 'xla' or 'im2col_grad'; see `fm_adapt.models.conv`.
    weight_init: 'torchvision' (torchvision's ResNet) or 'pytorch' (PyTorch's layer defaults, the
      MedMNIST v2 28-px ResNet); see the module docstring.
    remat: rematerialize each residual block (`nn.remat`): its activations are recomputed in
      the backward pass instead of kept, for less memory at ~1/3 more compute.
  """
  num_classes: int
  depth: int = 18
  stem: str = 'cifar'
  width: int = 64
  zero_init_residual: bool = False
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'
  weight_init: str = 'torchvision'
  remat: bool = False

  def _check_config(self) -> None:
    """Raises ValueError on an invalid depth, stem or init."""
    if self.depth not in DEPTHS:
      raise ValueError(f'Unknown ResNet depth {self.depth}; valid: {sorted(DEPTHS)}.')
    if self.stem not in STEMS:
      raise ValueError(f'Unknown ResNet stem {self.stem!r}; valid: {list(STEMS)}.')
    if self.weight_init not in CONV_INITS:
      raise ValueError(f'Unknown ResNet weight_init {self.weight_init!r}; '
                       f'valid: {sorted(CONV_INITS)}.')

  @nn.compact
  def __call__(self, image: Array, *, train: bool = False,
               mask: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Runs the model.

    Args:
      image: float images [B, H, W, C].
      train: use batch statistics and update the running ones (pass
        mutable=['batch_stats'] to `apply`); otherwise use the running statistics.
      mask: optional bool [B], False for padding rows, which then take no part in the batch
        statistics (their outputs are computed but meaningless).

    Returns:
      (logits, out) where out holds 'features' (the last feature map [B, h, w, F]),
      'pre_logits' [B, F] (its spatial mean) and 'logits'.
    """
    self._check_config()
    if image.ndim != 4:
      raise ValueError(f'ResNet expects images [B, H, W, C], got shape {image.shape}.')
    block_cls, stage_sizes = DEPTHS[self.depth]
    x = Stem(self.stem, self.width, self.dtype, self.conv_impl, self.weight_init,
             name='stem')(image, train, mask)
    for s, num_blocks in enumerate(stage_sizes):
      x = Stage(block_cls, num_blocks, self.width * 2**s, stride=1 if s == 0 else 2,
                zero_init_residual=self.zero_init_residual, dtype=self.dtype,
                conv_impl=self.conv_impl, weight_init=self.weight_init, remat=self.remat,
                name=f'stage_{s}')(x, train, mask)
    out = {'features': x}
    x = out['pre_logits'] = jnp.mean(x, axis=(1, 2))
    if self.num_classes:  # PyTorch's nn.Linear default (torchvision keeps it for the head).
      x = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_PYTORCH_DEFAULT,
                   bias_init=_pytorch_bias_init(x.shape[-1]), name='head')(x)
    logits = out['logits'] = x.astype(jnp.float32)
    return logits, out
