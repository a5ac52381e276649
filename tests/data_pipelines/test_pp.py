"""Tests of every preprocessing op of data_pipelines.pp, on MedMNIST-layout images."""
import pickle

import jax
import numpy as np
import pytest

from data_pipelines import pp


@pytest.fixture(scope='module')
def images(synthetic_medmnist):
  """A grey (28, 28, 1) and an RGB (28, 28, 3) uint8 image of the synthetic sets (no symmetry)."""
  grey = synthetic_medmnist['binary'].arrays()['train_images'][0][..., None]
  rgb = synthetic_medmnist['ordinal_rgb'].arrays()['train_images'][0]
  assert grey.dtype == rgb.dtype == np.uint8
  return {'grey': grey, 'rgb': rgb}


def run(pp_string, image, seed=0, label=3):
  return pp.parse(pp_string)({'image': image, 'label': label}, np.random.default_rng(seed))


def test_registry_has_the_documented_ops():
  assert set(pp.PP_OPS) >= {'resize', 'center_crop', 'random_crop', 'gray_to_rgb', 'value_range',
                            'normalize', 'flip_lr', 'flip_ud', 'rot90', 'to_float'}


@pytest.mark.parametrize('size', [64, 14, 20])
def test_resize_float_matches_jax_bilinear(images, size):
  image = images['rgb'].astype(np.float32)
  out = run(f'resize({size})', image)['image']
  want = jax.image.resize(image, (size, size, 3), 'bilinear', antialias=True)
  assert out.dtype == np.float32 and out.shape == (size, size, 3)
  np.testing.assert_allclose(out, np.asarray(want), atol=1e-3)


def test_resize_uint8_stays_uint8_and_rounds(images):
  out = run('resize((40, 20))', images['grey'])['image']
  want = jax.image.resize(images['grey'].astype(np.float32), (40, 20, 1), 'bilinear')
  assert out.dtype == np.uint8 and out.shape == (40, 20, 1)
  assert np.abs(out.astype(np.float32) - np.asarray(want)).max() <= 1.0


def test_resize_same_size_is_identity(images):
  np.testing.assert_array_equal(run('resize(28)', images['rgb'])['image'], images['rgb'])


def test_center_crop(images):
  out = run('center_crop(20)', images['rgb'])['image']
  np.testing.assert_array_equal(out, images['rgb'][4:24, 4:24])
  with pytest.raises(ValueError, match='smaller'):
    run('center_crop(30)', images['rgb'])


def test_random_crop_is_a_window_of_the_padded_image(images):
  padded = np.pad(images['grey'], ((4, 4), (4, 4), (0, 0)))
  offsets = set()
  for seed in range(20):
    out = run('random_crop(28, pad=4)', images['grey'], seed=seed)['image']
    assert out.shape == (28, 28, 1)
    hits = [(t, l) for t in range(9) for l in range(9)
            if np.array_equal(padded[t:t + 28, l:l + 28], out)]
    assert hits
    offsets.add(hits[0])
  assert len(offsets) > 5
  np.testing.assert_array_equal(run('random_crop(20)', images['rgb'], seed=7)['image'],
                                run('random_crop(20)', images['rgb'], seed=7)['image'])


def test_gray_to_rgb(images):
  out = run('gray_to_rgb', images['grey'])['image']
  assert out.shape == (28, 28, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], images['grey'][..., 0])
  np.testing.assert_array_equal(run('gray_to_rgb', images['rgb'])['image'], images['rgb'])
  with pytest.raises(ValueError, match='1 or 3 channels'):
    run('gray_to_rgb', np.zeros((4, 4, 2), np.uint8))


def test_value_range(images):
  out = run('value_range(-1, 1)', images['rgb'])['image']
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, images['rgb'] / 127.5 - 1, atol=1e-6)
  ends = run('value_range(-1,1)', np.array([[[0], [255]]], np.uint8))['image']
  np.testing.assert_allclose(ends.ravel(), [-1, 1])
  out = run('value_range(0, 1, in_min=-1, in_max=1)', np.array([[[-1.0], [0.0]]], np.float32))
  np.testing.assert_allclose(out['image'].ravel(), [0, 0.5])


def test_normalize_imagenet_default(images):
  out = run('normalize', images['rgb'])['image']
  want = (images['rgb'] / 255.0 - np.array(pp.IMAGENET_MEAN)) / np.array(pp.IMAGENET_STD)
  assert out.dtype == np.float32
  np.testing.assert_allclose(out, want, atol=1e-5)
  np.testing.assert_allclose(run("normalize('imagenet')", images['rgb'])['image'], out)


def test_normalize_explicit_and_errors(images):
  out = run('normalize(0.5, 0.25)', images['grey'])['image']
  np.testing.assert_allclose(out, (images['grey'] / 255.0 - 0.5) / 0.25, atol=1e-5)
  with pytest.raises(ValueError, match='gray_to_rgb'):
    run('normalize', images['grey'])
  with pytest.raises(ValueError, match='std'):
    pp.parse('normalize((0.5, 0.5), (1.0,))')
  with pytest.raises(ValueError, match='preset'):
    pp.parse("normalize('cifar')")


@pytest.mark.parametrize('op, axis', [('flip_lr', 1), ('flip_ud', 0)])
def test_flips(images, op, axis):
  image = images['rgb']
  np.testing.assert_array_equal(run(f'{op}(p=1)', image)['image'], np.flip(image, axis))
  np.testing.assert_array_equal(run(f'{op}(p=0)', image)['image'], image)
  flipped = [not np.array_equal(run(op, image, seed=s)['image'], image) for s in range(200)]
  assert 0.35 < np.mean(flipped) < 0.65
  with pytest.raises(ValueError, match='probability'):
    pp.parse(f'{op}(2)')


def test_rot90(images):
  image = images['rgb']
  rotations = [np.rot90(image, k, axes=(0, 1)) for k in range(4)]
  seen = set()
  for seed in range(40):
    out = run('rot90', image, seed=seed)['image']
    seen.add(next(k for k, r in enumerate(rotations) if np.array_equal(out, r)))
  assert seen == {0, 1, 2, 3}
  with pytest.raises(ValueError, match='square'):
    run('rot90', np.zeros((4, 6, 1), np.uint8))


def test_to_float(images):
  out = run('to_float', images['grey'])['image']
  assert out.dtype == np.float32
  np.testing.assert_array_equal(out, images['grey'].astype(np.float32))


def test_pipeline_composes_keeps_other_fields_and_is_deterministic(images):
  pp_string = 'resize(32)|gray_to_rgb|random_crop(28, pad=2)|flip_lr|rot90|value_range(-1, 1)'
  a = run(pp_string, images['grey'], seed=5, label=1)
  b = run(pp_string, images['grey'], seed=5, label=1)
  assert a['image'].shape == (28, 28, 3) and a['image'].dtype == np.float32
  assert a['label'] == 1
  np.testing.assert_array_equal(a['image'], b['image'])
  differs = [not np.array_equal(run(pp_string, images['grey'], seed=s)['image'], a['image'])
             for s in range(6, 12)]
  assert any(differs)


def test_pipeline_does_not_modify_its_input(images):
  image = images['rgb'].copy()
  image.flags.writeable = False  # Sources may hand out read-only arrays.
  run('flip_lr(p=1)|rot90|random_crop(24, pad=2)|resize(28)|value_range', image)
  np.testing.assert_array_equal(image, images['rgb'])


def test_empty_string_is_identity(images):
  example = {'image': images['grey'], 'label': 0}
  assert pp.parse('')(example, np.random.default_rng(0)) is example


def test_pickles_as_its_string(images):
  fn = pp.parse('resize(20)|flip_lr')
  clone = pickle.loads(pickle.dumps(fn))
  np.testing.assert_array_equal(run('resize(20)|flip_lr', images['rgb'], seed=2)['image'],
                                clone({'image': images['rgb']}, np.random.default_rng(2))['image'])


@pytest.mark.parametrize('pp_string, message', [
    ('resize(64)|sharpen', "Unknown pp op 'sharpen'.*valid names: .*'center_crop'"),
    ('resize', 'missing a required argument'),
    ('resize(1, 2, 3)', r'too many positional arguments.*resize\(size, method='),
    ('resize(0)', 'positive int'),
    ('resize(64.5)', 'positive int'),
    ('random_crop(28, pad=-1)', 'pad must be'),
    ('random_crop(28, padding=4)', 'unexpected keyword'),
    ('value_range(lo)', 'Python literals'),
    ('value_range(1, 2, 3, 3)', 'must differ'),
    ('resize(64', 'Cannot parse'),
    ('gray_to_rgb(3)', 'too many positional'),
])
def test_bad_pp_strings(pp_string, message):
  with pytest.raises(ValueError, match=message):
    pp.parse(pp_string)


def test_volume_value_ops_and_2d_only_errors():
  volume = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3, 1)
  out = run('to_float|value_range(0, 1, in_max=255)', volume)['image']
  assert out.shape == volume.shape
  with pytest.raises(ValueError, match='2D images'):
    run('flip_lr', volume)


def test_resize_nearest_replicates_pixels_like_medmnist_v2(images):
  """28 -> 224 with 'nearest' is 8x8 pixel replication (the official MedMNIST v2 resize)."""
  out = run("resize(224, method='nearest')", images['grey'])['image']
  assert out.dtype == np.uint8 and out.shape == (224, 224, 1)
  np.testing.assert_array_equal(out, np.repeat(np.repeat(images['grey'], 8, 0), 8, 1))


def test_resize_unknown_method_names_the_valid_ones():
  with pytest.raises(ValueError, match="unknown method 'lanczos'.*nearest"):
    pp.parse("resize(64, method='lanczos')")


# One instance of every op, with the arguments it needs (on a (6, 6, 1) uint8 image).
_EVERY_OP = {'resize': 'resize(5)', 'center_crop': 'center_crop(4)',
             'random_crop': 'random_crop(4)', 'gray_to_rgb': 'gray_to_rgb',
             'value_range': 'value_range', 'normalize': 'normalize(0.5, 0.25)',
             'flip_lr': 'flip_lr', 'flip_ud': 'flip_ud', 'rot90': 'rot90', 'to_float': 'to_float',
             'corrupt': "corrupt('gaussian_noise', 3, modality='chest_xray')"}


def test_every_op_declares_truly_whether_it_is_random():
  assert set(pp.RANDOM_OPS) == set(pp.PP_OPS) == set(_EVERY_OP)
  image = np.arange(36, dtype=np.uint8).reshape(6, 6, 1)  # No symmetry: every flip shows.
  for name, spec in _EVERY_OP.items():
    outputs = {run(spec, image, seed=seed)['image'].tobytes() for seed in range(12)}
    assert (len(outputs) > 1) == pp.RANDOM_OPS[name], name


def test_an_op_without_a_declaration_is_refused(monkeypatch):
  monkeypatch.setitem(pp.PP_OPS, 'invert', lambda: lambda example, rng: example)
  with pytest.raises(ValueError, match="'invert' does not declare whether it is random.*RANDOM_OPS"):
    pp.parse('invert')


def test_drop_random_keeps_the_deterministic_ops_as_written():
  train = "resize(64, method='nearest')|flip_lr|random_crop(60, pad=2)|value_range(-1,1)|rot90"
  assert pp.random_ops(train) == ['flip_lr', 'random_crop(60, pad=2)', 'rot90']
  assert pp.drop_random(train) == "resize(64, method='nearest')|value_range(-1,1)"
  assert pp.drop_random('flip_lr') == '' and pp.drop_random('') == ''
  with pytest.raises(ValueError, match="Unknown pp op 'sharpen'"):
    pp.drop_random('resize(64)|sharpen')  # An unknown op is still an error.


def test_check_deterministic_names_the_random_op_and_the_fix():
  pp.check_deterministic('resize(64)|value_range(-1,1)', 'config.input.eval_pp')
  with pytest.raises(ValueError, match=r"config.input.eval_pp='resize\(64\)\|flip_ud\(p=0.1\)' "
                                       r"holds random op\(s\) \['flip_ud\(p=0.1\)'\].*"
                                       r"config.input.eval_pp='resize\(64\)'"):
    pp.check_deterministic('resize(64)|flip_ud(p=0.1)', 'config.input.eval_pp')
