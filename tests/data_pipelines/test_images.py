"""Tests of data_pipelines.images: bit depth kept, modes, and errors that name the file."""
import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from data_pipelines import images

SIZE = (64, 64)


def ramp16(lo: int = 0, hi: int = 65535) -> np.ndarray:
  """A 64x64 uint16 ramp from `lo` to `hi` in row-major order (4096 distinct values)."""
  return np.linspace(lo, hi, SIZE[0] * SIZE[1]).round().astype(np.uint16).reshape(SIZE)


def save16(path, array: np.ndarray):
  """Writes a 16-bit grey PNG or TIFF with PIL and checks PIL reads it back at 16 bits."""
  Image.fromarray(array).save(path)
  with Image.open(path) as image:
    assert image.mode.startswith('I;16')
    np.testing.assert_array_equal(np.asarray(image), array)
  return path


def save_rgb16_png(path, array: np.ndarray):
  """A 16-bit RGB PNG, written by hand (PIL cannot write one)."""
  h, w, _ = array.shape
  rows = b''.join(b'\0' + array[i].astype('>u2').tobytes() for i in range(h))

  def chunk(kind, data):
    return struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))

  header = struct.pack('>IIBBBBB', w, h, 16, 2, 0, 0, 0)  # 16 bits, colour type 2 (RGB).
  path.write_bytes(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', header)
                   + chunk(b'IDAT', zlib.compress(rows)) + chunk(b'IEND', b''))
  return path


def assert_ramp_kept(out: np.ndarray):
  flat = out[..., 0].reshape(-1)
  assert out.dtype == np.uint8
  assert len(np.unique(flat)) > 200  # PIL's 8-bit conversion kept 17.
  assert (np.diff(flat.astype(int)) >= 0).all()  # Order kept.
  assert (flat == 255).mean() < 0.01  # PIL's put 99.6 % at 255.


@pytest.mark.parametrize('suffix', ['png', 'tif'])
@pytest.mark.parametrize('policy', ['per_image', 'per_dataset', 'full_range'])
def test_16_bit_ramp_keeps_its_range_and_order(tmp_path, suffix, policy):
  path = save16(tmp_path / f'ramp.{suffix}', ramp16())
  value_range = images.value_range([path]) if policy == 'per_dataset' else None
  out = images.load_image(path, SIZE, 1, policy, value_range)
  assert out.shape == (*SIZE, 1)
  assert_ramp_kept(out)
  assert out.min() == 0 and out.max() == 255
  if policy == 'full_range':
    np.testing.assert_array_equal(out[..., 0], ramp16() // 256)
  else:
    np.testing.assert_array_equal(out[..., 0], np.round(ramp16() / 65535 * 255).astype(np.uint8))


def test_big_endian_16_bit_tiff(tmp_path):
  path = tmp_path / 'big_endian.tif'
  Image.frombytes('I;16B', SIZE[::-1], ramp16().astype('>u2').tobytes()).save(path)
  with Image.open(path) as image:
    assert image.mode == 'I;16B'
    np.testing.assert_array_equal(np.asarray(image), ramp16())
  assert_ramp_kept(images.load_image(path, SIZE, 1, 'per_image'))


def test_per_image_and_per_dataset_differ_on_a_narrow_image(tmp_path):
  full = save16(tmp_path / 'full.png', ramp16())
  narrow = save16(tmp_path / 'narrow.tif', ramp16(1000, 5000))  # A 12-bit export.
  assert images.value_range([full, narrow]) == (0.0, 65535.0)
  per_image = images.load_image(narrow, SIZE, 1, 'per_image')
  assert per_image.min() == 0 and per_image.max() == 255
  per_dataset = images.load_image(narrow, SIZE, 1, 'per_dataset', (0.0, 65535.0))
  assert per_dataset.min() == round(1000 / 65535 * 255) and per_dataset.max() == round(
      5000 / 65535 * 255)
  assert images.value_range([narrow]) == (1000.0, 5000.0)


def test_resize_and_channels_of_a_16_bit_image(tmp_path):
  path = save16(tmp_path / 'ramp.png', ramp16())
  out = images.load_image(path, (32, 40), 3, 'per_image')
  assert out.shape == (32, 40, 3) and out.dtype == np.uint8
  resized = np.asarray(Image.fromarray(ramp16().astype(np.float32)).resize(
      (40, 32), Image.Resampling.BILINEAR))
  want = np.round(resized / 65535 * 255).astype(np.uint8)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], want)


def test_wide_modes_rescale(tmp_path):
  values = np.linspace(-3.5, 2.0, SIZE[0] * SIZE[1], dtype=np.float32).reshape(SIZE)
  Image.fromarray(values).save(tmp_path / 'float.tif')
  Image.fromarray((values * 1e6).astype(np.int32)).save(tmp_path / 'int32.tif')
  for name in ('float.tif', 'int32.tif'):
    out = images.load_image(tmp_path / name, SIZE, 1, 'per_image')
    assert out.min() == 0 and out.max() == 255 and len(np.unique(out)) == 256


def test_eight_bit_images_are_unchanged_by_every_policy(tmp_path):
  array = np.arange(64 * 64, dtype=np.uint32).reshape(SIZE) % 200 + 20
  path = tmp_path / 'grey.png'
  Image.fromarray(array.astype(np.uint8)).save(path)
  for policy in images.HIGH_BIT_DEPTHS:
    np.testing.assert_array_equal(images.load_image(path, SIZE, 1, policy)[..., 0], array)


@pytest.mark.parametrize('suffix', ['png', 'tif'])
def test_16_bit_is_refused_by_default_naming_file_and_option(tmp_path, suffix):
  path = save16(tmp_path / f'ramp.{suffix}', ramp16())
  with pytest.raises(images.ImageFileError) as e:
    images.load_image(path, SIZE, 1)
  message = str(e.value)
  assert str(path) in message and 'high_bit_depth' in message and 'per_image' in message


def test_16_bit_colour_only_with_full_range(tmp_path):
  ramp = ramp16()
  path = save_rgb16_png(tmp_path / 'rgb16.png', np.stack([ramp, ramp, ramp], -1))
  for policy in ('error', 'per_image', 'per_dataset'):
    with pytest.raises(images.ImageFileError, match="16-bit colour.*'full_range'") as e:
      images.load_image(path, SIZE, 3, policy, (0.0, 1.0))
    assert str(path) in str(e.value)
  with pytest.raises(images.ImageFileError, match='16-bit colour'):
    images.value_range([path])
  out = images.load_image(path, SIZE, 3, 'full_range')
  np.testing.assert_array_equal(out[..., 1], ramp // 256)


@pytest.mark.parametrize('name, array', [
    ('float.tif', np.ones(SIZE, np.float32)), ('int32.tif', np.ones(SIZE, np.int32))])
def test_full_range_refuses_modes_without_a_range(tmp_path, name, array):
  Image.fromarray(array).save(tmp_path / name)
  with pytest.raises(images.ImageFileError, match=f"{name}.*no fixed range.*'per_image'"):
    images.load_image(tmp_path / name, SIZE, 1, 'full_range')


def png_bytes() -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(np.random.default_rng(0).integers(0, 255, SIZE, np.uint8)).save(buffer, 'PNG')
  return buffer.getvalue()


def make_truncated(path):
  path.write_bytes(png_bytes()[:300])


def make_not_an_image(path):
  path.write_bytes(b'these bytes are not an image' * 10)


def make_lab(path):
  Image.new('LAB', SIZE, (50, 10, 10)).save(path)


def make_stack(path):
  frames = [Image.fromarray(np.full(SIZE, i, np.uint8)) for i in range(3)]
  frames[0].save(path, save_all=True, append_images=frames[1:])


def make_nan(path):
  Image.fromarray(np.full(SIZE, np.nan, np.float32)).save(path)


@pytest.mark.parametrize('make, name, message', [
    (make_truncated, 'cut.png', 'not a whole image.*truncated'),
    (make_not_an_image, 'text.png', 'not a whole image.*cannot identify'),
    (make_lab, 'lab.tif', "PIL mode 'LAB', which is not supported"),
    (make_stack, 'stack.tif', 'holds 3 frames'),
    (make_nan, 'nan.tif', 'NaN or infinite'),
])
@pytest.mark.parametrize('channels', [1, 3])
def test_bad_images_are_errors_naming_the_file(tmp_path, make, name, message, channels):
  path = tmp_path / name
  make(path)
  with pytest.raises(images.ImageFileError, match=message) as e:
    images.load_image(path, SIZE, channels, 'per_image')
  assert str(path) in str(e.value)


def test_missing_file_names_it(tmp_path):
  path = tmp_path / 'gone.png'
  with pytest.raises(FileNotFoundError, match='Cannot read image file .*gone.png'):
    images.load_image(path, SIZE, 1)


def test_unknown_policy():
  with pytest.raises(ValueError, match=r"Unknown high_bit_depth 'clip'; valid: \['error'"):
    images.check_high_bit_depth('clip')
