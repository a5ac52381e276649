"""fm_adapt.models.posemb_resize against PyTorch's F.interpolate, the operator each family calls
(DINOv2 with its scale-factor offset, timm / open_clip with antialias, Hugging Face without)."""
import numpy as np
import pytest

from fm_adapt.models import posemb_resize

torch = pytest.importorskip('torch', reason='PyTorch is the oracle (pip install -e ".[test]")')
F = torch.nn.functional

CASES = [((37, 37), (16, 16)), ((37, 37), (2, 3)), ((4, 4), (7, 5)), ((3, 5), (6, 2)),
         ((14, 14), (16, 16))]


def _torch(pos, old, new, method):
  grid = torch.from_numpy(pos).reshape(1, *old, -1).permute(0, 3, 1, 2)
  if method == 'dinov2':  # facebookresearch/dinov2 interpolate_pos_encoding.
    out = F.interpolate(grid, mode='bicubic', antialias=False,
                        scale_factor=((new[0] + 0.1) / old[0], (new[1] + 0.1) / old[1]))
  else:
    out = F.interpolate(grid, size=new, mode='bicubic', align_corners=False,
                        antialias=method == 'bicubic_antialias')
  assert tuple(out.shape[-2:]) == new
  return out.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).numpy()


@pytest.mark.parametrize('old, new', CASES)
@pytest.mark.parametrize('method', ['bicubic', 'bicubic_antialias', 'dinov2'])
def test_matches_torch_interpolate(old, new, method):
  pos = np.random.default_rng(0).normal(size=(1, old[0] * old[1], 8)).astype(np.float32)
  ours = np.asarray(posemb_resize.resize(pos, old, new, method))
  np.testing.assert_allclose(ours, _torch(pos, old, new, method), atol=3e-5)


def test_errors():
  pos = np.zeros((1, 16, 4), np.float32)
  with pytest.raises(ValueError, match='does not hold the 16'):
    posemb_resize.resize(pos, (3, 3), (2, 2), 'bicubic')
  with pytest.raises(ValueError, match="valid: .*'dinov2'"):
    posemb_resize.resize(pos, (4, 4), (2, 2), 'lanczos')
