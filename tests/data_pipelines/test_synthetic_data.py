"""Tests of the synthetic MedMNIST-layout fixture (tests/conftest.py): layout, and labels that a
simple rule learnt on train predicts on test, so models trained on it have something to learn."""
import numpy as np
import pytest

from data_pipelines import npz


@pytest.mark.parametrize('name, image_shape, label_width', [
    ('binary', (28, 28), 1), ('ordinal_rgb', (28, 28, 3), 1), ('multilabel', (28, 28), 14),
    ('volume', (28, 28, 28), 1)])
def test_official_keys_dtypes_and_shapes(synthetic_medmnist, name, image_shape, label_width):
  synthetic = synthetic_medmnist[name]
  headers = npz.read_headers(synthetic.path)
  assert npz.layout_splits(synthetic.path, headers) == npz.SPLITS
  for split, n in synthetic.split_sizes.items():
    assert headers[f'{split}_images'] == npz.ArrayHeader((n, *image_shape), np.dtype(np.uint8))
    assert headers[f'{split}_labels'] == npz.ArrayHeader((n, label_width), np.dtype(np.uint8))


def threshold_accuracy(arrays, feature) -> float:
  """Test accuracy of the midpoint threshold between the two train class means of `feature`."""
  x, y = feature(arrays['train_images']), arrays['train_labels'][:, 0]
  cut = (x[y == 0].mean() + x[y == 1].mean()) / 2
  return float(np.mean((feature(arrays['test_images']) > cut) == arrays['test_labels'][:, 0]))


@pytest.mark.parametrize('name', ['binary', 'volume'])
def test_binary_labels_follow_the_brightness(synthetic_medmnist, name):
  arrays = synthetic_medmnist[name].arrays()
  mean = lambda images: images.reshape(len(images), -1).mean(1)
  assert threshold_accuracy(arrays, mean) == 1.0


def test_ordinal_grades_follow_red_minus_blue(synthetic_medmnist):
  arrays = synthetic_medmnist['ordinal_rgb'].arrays()
  feature = lambda images: images[..., 0].mean((1, 2)) - images[..., 2].mean((1, 2))
  x, y = feature(arrays['train_images']), arrays['train_labels'][:, 0]
  centroids = np.array([x[y == g].mean() for g in range(5)])
  assert (np.diff(centroids) > 0).all()  # Ordered grades.
  predicted = np.abs(feature(arrays['test_images'])[:, None] - centroids).argmin(1)
  np.testing.assert_array_equal(predicted, arrays['test_labels'][:, 0])


def test_multilabel_labels_follow_the_bright_cells(synthetic_medmnist):
  arrays = synthetic_medmnist['multilabel'].arrays()
  cells = lambda images: images.reshape(len(images), 2, 14, 7, 4).mean((2, 4)).reshape(-1, 14)
  x, y = cells(arrays['train_images']), arrays['train_labels']
  cut = (x[y == 0].mean() + x[y == 1].mean()) / 2
  np.testing.assert_array_equal(cells(arrays['test_images']) > cut, arrays['test_labels'] == 1)


def test_every_split_holds_every_class(synthetic_medmnist):
  for name, synthetic in synthetic_medmnist.items():
    for split, labels in synthetic.arrays().items():
      if not split.endswith('_labels'):
        continue
      if synthetic.task == 'multilabel':
        assert labels.min(0).max() == 0 and labels.max(0).min() == 1, (name, split)
      else:
        assert set(labels[:, 0]) == set(range(synthetic.num_classes)), (name, split)
