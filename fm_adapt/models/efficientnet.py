"""EfficientNet-Lite in Flax linen.

EfficientNet-Lite (Tan & Le, 2019; the TF-Lite friendly variant) is EfficientNet
without squeeze-and-excitation, with ReLU6 activations and a fixed stem and head.
The layer layout follows the official TensorFlow model, so the converted ImageNet
checkpoint (`fm_adapt.weights.efficientnet_lite`) reproduces its predictions:
TF "SAME" padding (asymmetric for stride 2) and BatchNorm epsilon 1e-3.

Parameter names are chosen for path regexes:

  stem/conv, stem/bn
  block_{i}/expand_conv, expand_bn   (absent in blocks with expansion ratio 1)
  block_{i}/dw_conv, dw_bn
  block_{i}/project_conv, project_bn
  head_conv, head_bn, head           (head is the nn.Dense classifier)

Expand and project convolutions are 1x1 `nn.Conv` (kernels [1, 1, I, O]; all convolutions are
`fm_adapt.models.conv.Conv`, an nn.Conv subclass) and the classifier is `nn.Dense`, so kernel
transforms such as LoRA can target them.
"""
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from fm_adapt.models import batch_norm
from fm_adapt.models import conv


class BlockSpec(NamedTuple):
  """One MBConv block: channels in and out, depthwise kernel, stride, expansion."""
  features_in: int
  features_out: int
  kernel: int
  stride: int
  expand_ratio: int


_LITE0_BLOCKS = (
    BlockSpec(32, 16, 3, 1, 1),
    BlockSpec(16, 24, 3, 2, 6),
    BlockSpec(24, 24, 3, 1, 6),
    BlockSpec(24, 40, 5, 2, 6),
    BlockSpec(40, 40, 5, 1, 6),
    BlockSpec(40, 80, 3, 2, 6),
    BlockSpec(80, 80, 3, 1, 6),
    BlockSpec(80, 80, 3, 1, 6),
    BlockSpec(80, 112, 5, 1, 6),
    BlockSpec(112, 112, 5, 1, 6),
    BlockSpec(112, 112, 5, 1, 6),
    BlockSpec(112, 192, 5, 2, 6),
    BlockSpec(192, 192, 5, 1, 6),
    BlockSpec(192, 192, 5, 1, 6),
    BlockSpec(192, 192, 5, 1, 6),
    BlockSpec(192, 320, 3, 1, 6),
)

# variant -> (stem features, blocks, head features)
VARIANTS: dict[str, tuple[int, tuple[BlockSpec, ...], int]] = {
    'lite0': (32, _LITE0_BLOCKS, 1280),
}

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99


def decode_variant(variant: str) -> tuple[int, tuple[BlockSpec, ...], int]:
  """Returns (stem features, block specs, head features) of a variant name.

  Args:
    variant: a key of `VARIANTS`, e.g. 'lite0'.

  Raises:
    ValueError: for an unknown variant, listing the valid ones.
  """
  if variant not in VARIANTS:
    raise ValueError(
        f'Unknown EfficientNet variant {variant!r}; valid: {sorted(VARIANTS)}.')
  return VARIANTS[variant]


def _batch_norm(train: bool, dtype: Any, name: str) -> nn.BatchNorm:
  return nn.BatchNorm(
      use_running_average=not train, momentum=BN_MOMENTUM,
      epsilon=BN_EPSILON, dtype=dtype, name=name)


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str,
          groups: int = 1, conv_impl: str = 'auto') -> conv.Conv:
  return conv.Conv(
      features, (kernel, kernel), strides=(stride, stride), padding='SAME',
      feature_group_count=groups, use_bias=False, dtype=dtype, name=name,
      conv_impl=conv_impl)


class Stem(nn.Module):
  """3x3 stride-2 convolution, BatchNorm, ReLU6."""
  features: int
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
    x = _conv(self.features, 3, 2, self.dtype, 'conv', conv_impl=self.conv_impl)(x)
    x = batch_norm.normalize(_batch_norm(train, self.dtype, 'bn'), x, mask)
    return nn.relu6(x)


class MBConv(nn.Module):
  """Inverted-residual block without squeeze-excitation (EfficientNet-Lite).

  Attributes:
    spec: the block's channels, kernel, stride and expansion.
    dtype: compute dtype.
    conv_impl: convolution implementation, see `conv.Conv`.
  """
  spec: BlockSpec
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, mask: jax.Array | None = None) -> jax.Array:
    spec = self.spec
    inputs = x
    hidden = spec.features_in * spec.expand_ratio
    norm = lambda name, y: batch_norm.normalize(_batch_norm(train, self.dtype, name), y, mask)
    if spec.expand_ratio != 1:
      x = _conv(hidden, 1, 1, self.dtype, 'expand_conv', conv_impl=self.conv_impl)(x)
      x = nn.relu6(norm('expand_bn', x))
    x = _conv(hidden, spec.kernel, spec.stride, self.dtype, 'dw_conv',
              groups=hidden, conv_impl=self.conv_impl)(x)
    x = nn.relu6(norm('dw_bn', x))
    x = _conv(spec.features_out, 1, 1, self.dtype, 'project_conv', conv_impl=self.conv_impl)(x)
    x = norm('project_bn', x)
    if spec.stride == 1 and spec.features_in == spec.features_out:
      x = x + inputs
    return x


class Model(nn.Module):
  """EfficientNet-Lite classifier.

  Attributes:
    num_classes: width of the classifier `head`.
    variant: a key of `VARIANTS` (only 'lite0' so far).
    dropout: dropout rate before the classifier (active with train=True, which
      then needs a 'dropout' rng).
    dtype: computation dtype; parameters stay float32.
    conv_impl: convolution implementation of every conv: 'auto' (fast gradients on CPU,
      plain XLA elsewhere), 'xla' or 'im2col_grad'; see `fm_adapt.models.conv`.
  """
  num_classes: int = 1000
  variant: str = 'lite0'
  dropout: float = 0.2
  dtype: Any = jnp.float32
  conv_impl: str = 'auto'

  def __post_init__(self):
    decode_variant(self.variant)  # An unknown variant fails at construction.
    super().__post_init__()

  @nn.compact
  def __call__(self, image: jax.Array, *, train: bool = False,
               mask: jax.Array | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Classifies a batch of images.

    Args:
      image: [N, H, W, 3] float images, already normalized.
      train: BatchNorm uses batch statistics (mutable 'batch_stats') and dropout
        is active.
      mask: optional bool [N], False for padding rows, which then take no part in the batch
        statistics (see `fm_adapt.models.batch_norm`).

    Returns:
      (logits [N, num_classes], out) where out holds 'features' (the last feature
      map, [N, H/32, W/32, head features]), 'pre_logits' (its global average) and
      'logits'.
    """
    stem_features, blocks, head_features = decode_variant(self.variant)
    out = {}
    x = jnp.asarray(image, self.dtype)
    x = Stem(stem_features, self.dtype, self.conv_impl, name='stem')(x, train=train, mask=mask)
    for i, spec in enumerate(blocks):
      x = MBConv(spec, self.dtype, self.conv_impl, name=f'block_{i}')(x, train=train, mask=mask)
    x = _conv(head_features, 1, 1, self.dtype, 'head_conv', conv_impl=self.conv_impl)(x)
    x = nn.relu6(batch_norm.normalize(_batch_norm(train, self.dtype, 'head_bn'), x, mask))
    out['features'] = x
    x = out['pre_logits'] = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = out['logits'] = nn.Dense(self.num_classes, dtype=self.dtype,
                                 name='head')(x)
    return x, out
