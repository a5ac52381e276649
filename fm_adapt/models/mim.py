"""The ViT of masked image modelling: the classification ViT's encoder, a mask token, a decoder.

`Model` is `fm_adapt.models.vit.Model` (every field of it, same meaning) with a pixel decoder
on top and no head. Its encoder parameters have exactly the paths of a classification ViT of
the same configuration, so its export loads into one (`fm_adapt.weights.mim_encoder`): the
MIM-only parameters are

  mask_token [1,1,D]      decoder_type='linear' (SimMIM): replaces masked patch embeddings
  decoder/...             `fm_adapt.models.mim_decoders` (LinearDecoder / TransformerDecoder)

Calling convention (that of every model here): `logits, out = model.apply(variables, image,
train=...)` with logits = the pooled features (a ViT without head), and out['pred'] [B, N,
p*p*C] the predicted pixels of every patch. Masking is an argument, drawn by the objective
(`fm_adapt.objectives.mim`):

  decoder_type='linear'       patch_mask [B, N] bool: True patches enter as the mask token.
  decoder_type='transformer'  keep [B, K] int: the encoder sees only these patches.

Without them (init, evaluation) nothing is masked.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from fm_adapt.models import mim_decoders
from fm_adapt.models import vit

Array = jax.Array
DECODER_TYPES = ('linear', 'transformer')


class Model(vit.Model):
  """ViT encoder + mask token + pixel decoder (SimMIM with 'linear', MAE with 'transformer').

  Attributes (beyond `vit.Model`'s; `num_classes` must stay None: the model has no head):
    decoder_type: 'linear' (SimMIM: mask token in the encoder input, linear decoder) or
      'transformer' (MAE: the encoder sees the visible patches only, a transformer decoder).
    decoder_width: token width of the transformer decoder.
    decoder_depth: blocks of the transformer decoder.
    decoder_heads: attention heads of the transformer decoder.
    decoder_mlp_dim: MLP width of the transformer decoder's blocks.
  """
  num_classes: int | None = None
  decoder_type: str = 'linear'
  decoder_width: int = 128
  decoder_depth: int = 2
  decoder_heads: int = 4
  decoder_mlp_dim: int = 512

  def _check_mim(self, patch_mask: Array | None, keep: Array | None) -> None:
    if self.num_classes:
      raise ValueError(f'The MIM model has no head (it pretrains the encoder), but '
                       f'num_classes={self.num_classes}: build it with num_classes=None and '
                       "adapt its export with model_name='vit'.")
    if self.decoder_type not in DECODER_TYPES:
      raise ValueError(f'Unknown decoder_type {self.decoder_type!r}; valid: '
                       f'{list(DECODER_TYPES)}.')
    if self.decoder_type == 'linear' and keep is not None:
      raise ValueError("decoder_type='linear' (SimMIM) masks with patch_mask; `keep` (the "
                       "visible patches of MAE) needs decoder_type='transformer'.")
    if self.decoder_type == 'transformer' and patch_mask is not None:
      raise ValueError("decoder_type='transformer' (MAE) drops the masked patches with `keep`; "
                       "patch_mask (mask tokens in the encoder input) needs decoder_type='linear'.")

  @nn.compact
  def __call__(self, image: Array, *, train: bool = False, patch_mask: Array | None = None,
               keep: Array | None = None) -> tuple[Array, dict[str, Array]]:
    """Encodes the (masked) image and predicts the pixels of every patch.

    Args:
      image: float images [B, H, W, C].
      train: enables dropout.
      patch_mask: bool [B, N] (decoder_type='linear'): True patches enter as `mask_token`.
      keep: int [B, K] (decoder_type='transformer'): the visible patches, distinct indices.

    Returns:
      (pooled features [B, D] float32, out): out as `vit.Model` (without 'logits' of a head)
      plus 'pred' [B, N, p*p*C] float32.
    """
    self._check_mim(patch_mask, keep)
    cfg = vit.decode_variant(self.variant)
    patch, channels = cfg['patch_size'], image.shape[-1]
    if self.decoder_type == 'linear':
      mask_token = self.param('mask_token', nn.initializers.normal(stddev=0.02),
                              (1, 1, cfg['width']), jnp.float32)
      out = self._encode(image, train, patch_mask, mask_token)
      decoder = mim_decoders.LinearDecoder(patch, channels, dtype=self.dtype, name='decoder')
      out['pred'] = decoder(out['patch_tokens'])
    else:
      grid = (image.shape[1] // patch, image.shape[2] // patch)
      if keep is None:
        keep = jnp.broadcast_to(jnp.arange(grid[0] * grid[1]), (image.shape[0],
                                                                  grid[0] * grid[1]))
      out = self._encode(image, train, keep=keep)
      num_prefix = out['encoded'].shape[1] - keep.shape[1]
      decoder = mim_decoders.TransformerDecoder(
          patch, channels, width=self.decoder_width, depth=self.decoder_depth,
          num_heads=self.decoder_heads, mlp_dim=self.decoder_mlp_dim, dtype=self.dtype,
          name='decoder')
      out['pred'] = decoder(out['encoded'][:, :num_prefix], out['patch_tokens'], keep, grid)
    logits = out['logits'] = out['pre_logits'].astype(jnp.float32)
    return logits, out
