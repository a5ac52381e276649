"""Tests of the EfficientNet-Lite0 ImageNet import.

Against the real checkpoint (marked real_data): the Grace Hopper photo must come
out as ImageNet class 652 ("military uniform", README of the weights: p = 0.40
with (x-127)/128), and a plain-numpy forward pass that reads the PyTorch-layout
arrays directly (TF-SAME padding, BN eps 1e-3, ReLU6) must agree with the Flax
model on a random input. The strictness of the import is tested on a synthetic
checkpoint of the same layout (`lite0_state_dict` of conftest.py), which a real
data test checks against the real file.
"""
import jax
import matplotlib.cbook
import numpy as np
import PIL.Image
import pytest

from fm_adapt.models import efficientnet
from fm_adapt.weights import efficientnet_lite

NPZ = 'efficientnet-lite0-57934424.npz'
PTH = 'efficientnet-lite0-57934424.pth'
MILITARY_UNIFORM = 652


@pytest.fixture(scope='module')
def npz_arrays(shared_weights_dir) -> dict[str, np.ndarray]:
  with np.load(shared_weights_dir / NPZ, allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


@pytest.fixture(scope='module')
def variables(shared_weights_dir) -> dict:
  return efficientnet_lite.load_efficientnet_lite0(shared_weights_dir / NPZ)


@pytest.fixture(scope='module')
def predict():
  return jax.jit(efficientnet.Model(num_classes=1000).apply)


@pytest.fixture(scope='module')
def grace_hopper() -> np.ndarray:
  """[1, 224, 224, 3]: center crop, bicubic resize to 224, (x - 127) / 128."""
  with matplotlib.cbook.get_sample_data('grace_hopper.jpg') as f:
    image = PIL.Image.open(f).convert('RGB')
  w, h = image.size
  side = min(w, h)
  left, top = (w - side) // 2, (h - side) // 2
  image = image.crop((left, top, left + side, top + side))
  image = image.resize((224, 224), PIL.Image.BICUBIC)
  return ((np.asarray(image, np.float32) - 127.) / 128.)[None]


def _top1(predict, variables, image) -> tuple[int, float]:
  logits, _ = predict(variables, image)
  probs = np.asarray(jax.nn.softmax(logits[0]))
  return int(probs.argmax()), float(probs.max())


@pytest.mark.real_data('the real EfficientNet-Lite0 ImageNet weights (.npz) '
                       'classify the Grace Hopper photo as ImageNet class 652')
def test_grace_hopper_npz(variables, predict, grace_hopper):
  label, prob = _top1(predict, variables, grace_hopper)
  assert label == MILITARY_UNIFORM
  assert 0.3 < prob < 0.5, prob  # 0.39 here; the weights' README reports 0.40


@pytest.mark.real_data('the real EfficientNet-Lite0 .pth gives the same '
                       'variables as the .npz and the same ImageNet prediction')
def test_grace_hopper_pth(shared_weights_dir, variables, predict, grace_hopper):
  pytest.importorskip('torch')
  from_pth = efficientnet_lite.load_efficientnet_lite0(shared_weights_dir / PTH)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_pth, variables)
  assert _top1(predict, from_pth, grace_hopper)[0] == MILITARY_UNIFORM


@pytest.mark.real_data('the real EfficientNet-Lite0 checkpoint loads to the '
                       'full Lite0 tree (4,652,008 parameters)')
def test_loaded_tree(variables):
  params, stats = variables['params'], variables['batch_stats']
  assert sum(x.size for x in jax.tree_util.tree_leaves(params)) == 4_652_008
  assert params['block_3']['dw_conv']['kernel'].shape == (5, 5, 1, 144)
  assert params['head']['kernel'].shape == (1280, 1000)
  assert stats['block_0']['dw_bn']['var'].min() >= 0  # some channels are dead: var 0


def _same_pad(x: np.ndarray, kernel: int, stride: int) -> np.ndarray:
  """TensorFlow 'SAME' padding of NHWC x: the extra pixel goes bottom / right."""
  def pads(size):
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2
  return np.pad(x, ((0, 0), pads(x.shape[1]), pads(x.shape[2]), (0, 0)))


def _conv(x: np.ndarray, w: np.ndarray, stride: int = 1) -> np.ndarray:
  """NHWC convolution with a PyTorch OIHW weight; (C, 1, k, k) means depthwise."""
  k = w.shape[-1]
  depthwise = w.shape[1] == 1 and x.shape[-1] == w.shape[0] > 1
  x = _same_pad(x, k, stride)
  oh, ow = (x.shape[1] - k) // stride + 1, (x.shape[2] - k) // stride + 1
  out = 0.
  for i in range(k):
    for j in range(k):
      patch = x[:, i:i + stride * (oh - 1) + 1:stride, j:j + stride * (ow - 1) + 1:stride]
      out = out + (patch * w[:, 0, i, j] if depthwise else patch @ w[:, :, i, j].T)
  return out


def _numpy_forward(sd: dict[str, np.ndarray], x: np.ndarray) -> tuple[np.ndarray, ...]:
  """EfficientNet-Lite0 in float64 numpy from the PyTorch state dict: (features, logits)."""
  sd = {k: v.astype(np.float64) for k, v in sd.items()}
  relu6 = lambda y: np.clip(y, 0., 6.)
  def bn(y, name):
    return ((y - sd[f'{name}.running_mean']) / np.sqrt(sd[f'{name}.running_var'] + 1e-3)
            * sd[f'{name}.weight'] + sd[f'{name}.bias'])
  x = relu6(bn(_conv(x, sd['_conv_stem.weight'], 2), '_bn0'))
  for i, spec in enumerate(efficientnet.VARIANTS['lite0'][1]):
    pre, inputs = f'_blocks.{i}.', x
    if f'{pre}_expand_conv.weight' in sd:
      x = relu6(bn(_conv(x, sd[f'{pre}_expand_conv.weight']), f'{pre}_bn0'))
    x = relu6(bn(_conv(x, sd[f'{pre}_depthwise_conv.weight'], spec.stride), f'{pre}_bn1'))
    x = bn(_conv(x, sd[f'{pre}_project_conv.weight']), f'{pre}_bn2')
    if x.shape == inputs.shape:
      x = x + inputs
  features = relu6(bn(_conv(x, sd['_conv_head.weight']), '_bn1'))
  logits = features.mean((1, 2)) @ sd['_fc.weight'].T + sd['_fc.bias']
  return features, logits


@pytest.mark.real_data('the Flax model with the real EfficientNet-Lite0 '
                       'weights agrees with a numpy forward pass of the '
                       'PyTorch-layout arrays')
def test_matches_numpy_reference(npz_arrays, variables, predict):
  """Random 37x37 input (odd: asymmetric SAME padding at every stride 2); atol 1e-4."""
  x = np.random.default_rng(0).normal(size=(2, 37, 37, 3)).astype(np.float32)
  features, logits = _numpy_forward(npz_arrays, x.astype(np.float64))
  flax_logits, out = predict(variables, x)
  assert out['features'].shape == features.shape == (2, 2, 2, 1280)
  scale = np.abs(logits).max()
  np.testing.assert_allclose(np.asarray(out['features']), features, rtol=0, atol=1e-4 * 6)
  np.testing.assert_allclose(np.asarray(flax_logits), logits, rtol=0, atol=1e-4 * scale)


@pytest.mark.parametrize('edit, message', [
    (lambda sd: sd.pop('_fc.bias'), r'missing: nothing in the file fills params/head/bias'),
    (lambda sd: sd.update(extra=np.zeros(3)), r"unexpected key 'extra'"),
    (lambda sd: sd.update({'_blocks.3._depthwise_conv.weight': np.zeros((144, 1, 3, 3))}),
     r"shape mismatch for key '_blocks.3._depthwise_conv.weight' -> "
     r'params/block_3/dw_conv/kernel: checkpoint \(144, 1, 3, 3\) '
     r'\(Flax layout \(3, 3, 1, 144\)\) vs model \(5, 5, 1, 144\)'),
])
def test_strict(tmp_path, lite0_state_dict, edit, message):
  sd = dict(lite0_state_dict)
  edit(sd)
  np.savez(tmp_path / 'edited.npz', **sd)
  with pytest.raises(ValueError, match=message):
    efficientnet_lite.load_efficientnet_lite0(tmp_path / 'edited.npz')


def test_synthetic_checkpoint_loads_to_its_variables(tmp_path, lite0_state_dict,
                                                      lite0_variables):
  np.savez(tmp_path / 'synthetic.npz', **lite0_state_dict)
  loaded = efficientnet_lite.load_efficientnet_lite0(tmp_path / 'synthetic.npz')
  assert jax.tree_util.tree_structure(loaded) == jax.tree_util.tree_structure(
      lite0_variables)
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, lite0_variables)


@pytest.mark.real_data('the synthetic EfficientNet-Lite0 checkpoint of the tests '
                       'has the real checkpoint\'s keys, shapes and dtypes')
def test_synthetic_checkpoint_has_the_real_layout(npz_arrays, lite0_state_dict):
  assert sorted(lite0_state_dict) == sorted(npz_arrays)
  for key, value in npz_arrays.items():
    assert (lite0_state_dict[key].shape, lite0_state_dict[key].dtype) == (
        value.shape, value.dtype), key
