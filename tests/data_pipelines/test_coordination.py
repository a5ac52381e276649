"""Tests of data_pipelines.coordination in one process (outside a multi-process job).

What several processes do (process 0 builds, the others wait; a timeout, a failure on process 0
and an unshared directory are each one clear error) is tested with real processes in
tests/fm_adapt/train/test_multiprocess_data.py.
"""
import pytest

from data_pipelines import coordination
from data_pipelines import datasets


def test_one_process_prepares_itself_without_a_job(tmp_path):
  calls = []
  where = coordination.prepare_once(lambda: calls.append(1), 'some/dataset/1.0.0',
                                    str(tmp_path))
  assert calls == [1] and where == str(tmp_path)


def test_one_process_builds_a_fresh_dataset_and_reads_its_splits(synthetic_medmnist, tmp_path):
  data_cfg = synthetic_medmnist['binary'].data_cfg(tmp_path / 'tfds')
  source, spec = datasets.get_dataset(data_cfg, 'val')
  assert len(source) == spec.split_sizes['val'] == synthetic_medmnist['binary'].split_sizes['val']


def test_timeout_comes_from_the_environment(monkeypatch):
  monkeypatch.delenv(coordination.TIMEOUT_ENV, raising=False)
  assert coordination.timeout_s() == coordination.DEFAULT_TIMEOUT_S
  monkeypatch.setenv(coordination.TIMEOUT_ENV, '2.5')
  assert coordination.timeout_s() == 2.5


@pytest.mark.parametrize('value, message', [('soon', 'is not a number of seconds'),
                                            ('0', 'must be a positive number of seconds')])
def test_bad_timeout_is_a_clear_error(monkeypatch, value, message):
  monkeypatch.setenv(coordination.TIMEOUT_ENV, value)
  with pytest.raises(ValueError, match=f'FM_ADAPT_DATA_PREPARE_TIMEOUT_S={value!r} {message}'):
    coordination.timeout_s()
