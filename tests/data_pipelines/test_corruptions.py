"""Tests of the MedMNIST-C corruptions (data_pipelines.corruptions) and the pp op `corrupt`."""
import numpy as np
import pytest
from PIL import Image

from data_pipelines import corruptions
from data_pipelines import pp

PAIRS = sorted(corruptions.SEVERITY_PARAMS)  # (modality, name)
REAL_SETS = {'pneumoniamnist': 'chest_xray', 'breastmnist': 'ultrasound', 'retinamnist': 'fundus'}

# Severity steps s -> s + 1 (by modality, corruption, image size) where the distance to the clean
# image may go down. They are properties of the reference's parameters on 28-px images, not of
# this implementation; at 64 px (and at MedMNIST-C's 224 px) every step is an increase.
#   pixelate: the 28-px grid of the milder severity does not divide 28 and the stronger one does
#     (chest 0.6 -> 16 px, 0.5 -> 14 px; fundus the same; ultrasound 0.3 -> 8 px, 0.25 -> 7 px).
#     An aligned grid is an exact block mean (test_pixelate_aligned_grid_is_a_block_mean); a
#     misaligned one also blurs across block borders, so it is further from the clean image.
#   motion_blur: the step grows only the radius at the same sigma (fundus (8, 5) -> (15, 5),
#     ultrasound (9, 10) -> (13, 10)): the kernel gains a tail of small weights far along the line,
#     which on 28 px reaches the repeated border pixels; the distance barely moves either way.
PIXELATE_DIPS_28 = {'chest_xray': 3, 'fundus': 2, 'ultrasound': 1}
MOTION_TIES = {'fundus': 1, 'ultrasound': 3}


def synthetic(size: int, channels: int) -> np.ndarray:
  """A smooth uint8 image with structure: waves, a bright blob and a dark disk (values 10..205)."""
  y, x = np.mgrid[0:size, 0:size] / size
  planes = []
  for c in range(channels):
    v = 0.35 + 0.25 * np.sin(2 * np.pi * (1.5 * x + 0.5 * y + c / 3)) * np.cos(
        2 * np.pi * (0.7 * y - 0.3 * x))
    v = v + 0.3 * np.exp(-((x - 0.6 - 0.05 * c) ** 2 + (y - 0.4) ** 2) / 0.02)
    v = np.where((x - 0.3) ** 2 + (y - 0.7) ** 2 < 0.03, 0.4 * v, v)
    planes.append(v)
  return np.clip(np.stack(planes, -1) * 255, 0, 255).astype(np.uint8)


def distance(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).mean())


def check_monotone(distances, modality, name, size):
  """Distances over severities 1..5 never go down, except at the documented steps above."""
  for step in range(1, 5):
    before, after = distances[step - 1], distances[step]
    if name == 'pixelate' and size == 28 and PIXELATE_DIPS_28[modality] == step:
      continue  # Grid alignment; see PIXELATE_DIPS_28.
    if name == 'motion_blur' and size == 28 and MOTION_TIES[modality] == step:
      assert after >= 0.99 * before, (modality, name, step, distances)  # A near-tie only.
      continue
    assert after >= before, f'{modality}/{name} at {size} px: severity {step} -> {step + 1}: ' \
                            f'{np.round(distances, 3)}'


def test_tables_match_modalities():
  assert set(corruptions.MODALITIES) == {'chest_xray', 'ultrasound', 'fundus'}
  assert set(corruptions.MODALITY_OF_FLAG.values()) == set(corruptions.MODALITIES)
  assert set(PAIRS) == {(m, n) for m, names in corruptions.MODALITIES.items() for n in names}
  assert all(len(values) == 5 for values in corruptions.SEVERITY_PARAMS.values())
  assert set(corruptions.RANDOM_CORRUPTIONS) <= {n for _, n in PAIRS}
  # Spot checks against medmnistc-api registry.py (the same name differs per modality).
  assert corruptions.SEVERITY_PARAMS['chest_xray', 'pixelate'] == (0.8, 0.7, 0.6, 0.5, 0.4)
  assert corruptions.SEVERITY_PARAMS['ultrasound', 'pixelate'] == (0.3, 0.25, 0.2, 0.15, 0.1)
  assert corruptions.SEVERITY_PARAMS['fundus', 'jpeg'] == (30, 25, 20, 10, 5)
  assert corruptions.SEVERITY_PARAMS['ultrasound', 'motion_blur'][-1] == (17, 12)


@pytest.mark.parametrize('modality,name', PAIRS)
def test_shape_dtype_and_change(modality, name):
  for size in (28, 64):
    rgb = synthetic(size, 3)
    grey = synthetic(size, 1)
    for image in (rgb, grey, grey[..., 0]):
      for severity in corruptions.SEVERITIES:
        out = corruptions.corrupt(image, name, severity, modality, seed=0)
        assert out.shape == image.shape and out.dtype == np.uint8, (size, image.shape, severity)
      assert distance(out, image) > 0.5, (size, image.shape)  # Severity 5 changes the image.


@pytest.mark.parametrize('modality,name', PAIRS)
def test_deterministic_and_seeded(modality, name):
  image = synthetic(28, 3)
  first = corruptions.corrupt(image, name, 3, modality, seed=0)
  np.testing.assert_array_equal(first, corruptions.corrupt(image.copy(), name, 3, modality, 0))
  other_seed = corruptions.corrupt(image, name, 3, modality, seed=1)
  if name in corruptions.RANDOM_CORRUPTIONS:
    assert not np.array_equal(first, other_seed)
  else:
    np.testing.assert_array_equal(first, other_seed)


def test_noise_depends_on_the_image():
  """Two images differing in one pixel get other noise (the image's bytes seed the draws)."""
  image = synthetic(28, 1)
  changed = image.copy()
  changed[0, 0] += 1
  noise = [corruptions.corrupt(x, 'gaussian_noise', 3, 'chest_xray', 0).astype(int) - x
           for x in (image, changed)]
  assert (noise[0][1:] != noise[1][1:]).mean() > 0.5


@pytest.mark.parametrize('size', [28, 64])
@pytest.mark.parametrize('channels', [1, 3])
@pytest.mark.parametrize('modality,name', PAIRS)
def test_monotone_in_severity_synthetic(modality, name, size, channels):
  image = synthetic(size, channels)
  distances = [distance(corruptions.corrupt(image, name, s, modality, seed=0), image)
               for s in corruptions.SEVERITIES]
  check_monotone(distances, modality, name, size)


@pytest.mark.real_data('monotonicity on real MedMNIST test images')
@pytest.mark.parametrize('flag', sorted(REAL_SETS))
def test_monotone_in_severity_real(shared_data_dir, flag):
  """Mean distance over 16 real 28-px test images, for every corruption of the flag's modality."""
  modality = REAL_SETS[flag]
  with np.load(shared_data_dir / 'medmnist' / f'{flag}.npz', allow_pickle=False) as data:
    images = data['test_images'][:16]
  for name in corruptions.MODALITIES[modality]:
    distances = [np.mean([distance(corruptions.corrupt(x, name, s, modality, seed=0), x)
                          for x in images]) for s in corruptions.SEVERITIES]
    check_monotone(distances, modality, name, 28)


def test_pixelate_aligned_grid_is_a_block_mean():
  """Why pixelate can dip at 28 px: 0.5 -> a 14-px grid, exact 2x2 block means; 0.6 -> 16 px."""
  image = synthetic(28, 1)[..., 0]
  aligned = corruptions.corrupt(image, 'pixelate', 4, 'chest_xray', seed=0)  # factor 0.5
  blocks = image.reshape(14, 2, 14, 2).astype(np.float64).mean(axis=(1, 3))
  assert np.abs(aligned[::2, ::2] - blocks).max() <= 1  # PIL rounds in fixed point.
  np.testing.assert_array_equal(aligned, np.repeat(np.repeat(aligned[::2, ::2], 2, 0), 2, 1))
  misaligned = corruptions.corrupt(image, 'pixelate', 3, 'chest_xray', seed=0)  # factor 0.6
  assert distance(misaligned, image) > distance(aligned, image)


def test_grey_goes_through_rgb_like_medmnist_c():
  """A grey image is corrupted as RGB and converted back to L (MedMNIST-C's dataset_manager)."""
  grey = synthetic(28, 1)[..., 0]
  rgb = np.repeat(grey[..., None], 3, axis=-1)
  for modality, name in PAIRS:
    if name in corruptions.RANDOM_CORRUPTIONS:
      continue  # The draws differ (other bytes); the noise case is the next test.
    want = Image.fromarray(corruptions.corrupt(rgb, name, 5, modality, 0)).convert('L')
    np.testing.assert_array_equal(corruptions.corrupt(grey, name, 5, modality, 0),
                                  np.asarray(want), err_msg=f'{modality}/{name}')


def test_gaussian_noise_sigma_grey_and_rgb():
  """RGB noise has the severity's sigma; grey noise is the luma mean of three channel noises."""
  sigma = corruptions.SEVERITY_PARAMS['chest_xray', 'gaussian_noise'][4] * 255
  luma = np.sqrt(0.299 ** 2 + 0.587 ** 2 + 0.114 ** 2)  # 0.67
  flat = np.full((64, 64, 3), 128, np.uint8)
  rgb_std = corruptions.corrupt(flat, 'gaussian_noise', 5, 'chest_xray', 0).std()
  grey_std = corruptions.corrupt(flat[..., :1], 'gaussian_noise', 5, 'chest_xray', 0).std()
  assert rgb_std == pytest.approx(sigma, rel=0.05)
  assert grey_std == pytest.approx(luma * sigma, rel=0.08)


def test_impulse_noise_hits_the_amount_of_samples():
  amount = corruptions.SEVERITY_PARAMS['chest_xray', 'impulse_noise'][4]  # 0.02
  flat = np.full((64, 64, 3), 128, np.uint8)
  out = corruptions.corrupt(flat, 'impulse_noise', 5, 'chest_xray', 0)
  salt, pepper = (out == 255).mean(), (out == 0).mean()
  assert set(np.unique(out)) <= {0, 127, 128, 255}  # 128 / 255 * 255 truncates to 127.
  assert salt + pepper == pytest.approx(amount, rel=0.25)
  assert salt == pytest.approx(pepper, rel=0.4)


def test_gamma_table():
  ramp = np.arange(256, dtype=np.uint8).reshape(16, 16)
  out = corruptions.corrupt(ramp, 'gamma_up', 5, 'chest_xray', 0)  # gamma 1.6
  want = [int(255.999 * (v / 255) ** 1.6) for v in range(256)]
  np.testing.assert_array_equal(out.reshape(-1), want)


def test_gaussian_blur_matches_torch_reflect_conv():
  """The torchvision algorithm (reflect padding, 2D kernel, round) written in torch."""
  torch = pytest.importorskip('torch')
  image = synthetic(28, 3)
  for severity, k in enumerate(corruptions.SEVERITY_PARAMS['chest_xray', 'gaussian_blur'], 1):
    sigma = 0.15 * k + 0.35
    t = torch.linspace(-(k - 1) / 2, (k - 1) / 2, k)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(3, 1, k, k)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    x = torch.nn.functional.pad(x, [k // 2] * 4, mode='reflect')
    want = torch.round(torch.nn.functional.conv2d(x, kernel, groups=3))[0].permute(1, 2, 0)
    out = corruptions.corrupt(image, 'gaussian_blur', severity, 'chest_xray', 0)
    diff = np.abs(out.astype(int) - want.numpy().astype(int))
    assert diff.max() <= 1 and (diff == 0).mean() > 0.99, k


def test_motion_blur_is_a_one_sided_line():
  """ImageMagick's kernel: weights exp(-i^2 / 2 sigma^2) at i = 0..2r along the angle."""
  offsets = corruptions._motion_offsets(2, 1.5, 0.0)
  assert [(dy, dx) for dy, dx, _ in offsets] == [(0, i) for i in range(5)]
  weights = np.exp(-np.arange(5) ** 2 / (2 * 1.5 ** 2))
  np.testing.assert_allclose([w for *_, w in offsets], weights / weights.sum())
  assert [(dy, dx) for dy, dx, _ in corruptions._motion_offsets(2, 1.5, 45.0)] == [
      (0, 0), (1, 1), (1, 1), (2, 2), (3, 3)]
  # A bright dot is smeared to one side: |angle| <= 45 degrees, so toward smaller x only.
  dot = np.zeros((64, 64), np.uint8)
  dot[32, 32] = 255
  out = corruptions.corrupt(dot, 'motion_blur', 1, 'ultrasound', seed=0)  # radius 5, sigma 5
  _, xs = np.nonzero(out)
  assert len(xs) >= 6 and xs.max() == 32 and xs.min() >= 32 - 10 and out.max() < 255


def test_unknown_choices_name_the_valid_ones():
  image = synthetic(28, 1)
  with pytest.raises(ValueError, match="Unknown modality 'mri'.*chest_xray"):
    corruptions.corrupt(image, 'jpeg', 1, 'mri', 0)
  with pytest.raises(ValueError, match="'gamma_up' for modality 'fundus'.*'defocus_blur'"):
    corruptions.corrupt(image, 'gamma_up', 1, 'fundus', 0)
  with pytest.raises(ValueError, match=r'Severity must be one of \[1, 2, 3, 4, 5\]; got 0'):
    corruptions.corrupt(image, 'jpeg', 0, 'fundus', 0)
  with pytest.raises(ValueError, match='seed must be an int >= 0'):
    corruptions.corrupt(image, 'jpeg', 1, 'fundus', -1)
  with pytest.raises(ValueError, match='uint8 image.*before value_range'):
    corruptions.corrupt(image.astype(np.float32), 'jpeg', 1, 'fundus', 0)
  with pytest.raises(ValueError, match='uint8 image'):
    corruptions.corrupt(np.zeros((8, 8, 2), np.uint8), 'jpeg', 1, 'fundus', 0)


def test_pp_op_equals_the_function():
  image = synthetic(28, 3)
  spec = "corrupt('speckle_noise', 2, seed=3, modality='fundus')"
  out = pp.parse(f'{spec}|value_range(0, 1)')({'image': image, 'label': 1},
                                              np.random.default_rng(0))
  want = corruptions.corrupt(image, 'speckle_noise', 2, 'fundus', 3)
  np.testing.assert_allclose(out['image'], want / 255.0, atol=1e-6)
  assert out['label'] == 1
  # Deterministic: not dropped from an eval pp, allowed in one; the loader's rng is not used.
  assert pp.random_ops(spec) == [] and pp.drop_random(f'{spec}|flip_lr') == spec
  pp.check_deterministic(spec, 'config.evals.x.pp')
  again = pp.parse(spec)({'image': image}, np.random.default_rng(99))['image']
  np.testing.assert_array_equal(again, want)


def test_pp_op_errors():
  with pytest.raises(ValueError, match="pass modality=, one of.*'chest_xray'"):
    pp.parse("corrupt('jpeg', 1)")
  with pytest.raises(ValueError, match="Unknown corruption 'blur'.*'pixelate'"):
    pp.parse("corrupt('blur', 1, modality='ultrasound')")
  with pytest.raises(ValueError, match='Severity must be one of'):
    pp.parse("corrupt('jpeg', 6, modality='ultrasound')")
  with pytest.raises(ValueError, match='seed must be an int >= 0'):
    pp.parse("corrupt('jpeg', 1, seed=-2, modality='ultrasound')")
  with pytest.raises(ValueError, match='uint8 image.*before value_range'):
    pp.parse("value_range(0, 1)|corrupt('jpeg', 1, modality='ultrasound')")(
        {'image': synthetic(28, 1)}, np.random.default_rng(0))
