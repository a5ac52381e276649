"""Tests of data_pipelines.data_dir: resolution order, errors, writability."""

import pytest

from data_pipelines import data_dir


@pytest.fixture()
def dirs(tmp_path, monkeypatch):
  """A flag dir, an env dir and a cache home, with the environment pointing at them."""
  flag, env, cache_home = tmp_path / 'flag', tmp_path / 'env', tmp_path / 'cache'
  flag.mkdir()
  env.mkdir()
  monkeypatch.setenv('XDG_CACHE_HOME', str(cache_home))
  monkeypatch.setenv(data_dir.ENV_VAR, str(env))
  return flag, env, cache_home


def test_flag_wins_over_env(dirs):
  flag, _, _ = dirs
  assert data_dir.resolve_data_dir(str(flag)) == flag


def test_env_wins_over_cache(dirs):
  _, env, cache_home = dirs
  (cache_home / 'fm_adapt' / 'data').mkdir(parents=True)
  assert data_dir.resolve_data_dir() == env


def test_cache_when_neither(dirs, monkeypatch):
  _, _, cache_home = dirs
  monkeypatch.delenv(data_dir.ENV_VAR)
  cache = cache_home / 'fm_adapt' / 'data'
  cache.mkdir(parents=True)
  assert data_dir.resolve_data_dir() == cache


def test_cache_default_without_xdg(monkeypatch, tmp_path):
  monkeypatch.delenv('XDG_CACHE_HOME', raising=False)
  monkeypatch.setenv('HOME', str(tmp_path))
  assert data_dir.cache_data_dir() == tmp_path / '.cache' / 'fm_adapt' / 'data'


def test_missing_cache_names_all_three_ways(dirs, monkeypatch):
  monkeypatch.delenv(data_dir.ENV_VAR)
  with pytest.raises(FileNotFoundError) as e:
    data_dir.resolve_data_dir()
  message = str(e.value)
  assert 'data_dir flag' in message and data_dir.ENV_VAR in message
  assert str(dirs[2] / 'fm_adapt' / 'data') in message


def test_create_cache(dirs, monkeypatch):
  monkeypatch.delenv(data_dir.ENV_VAR)
  path = data_dir.resolve_data_dir(create_cache=True)
  assert path == dirs[2] / 'fm_adapt' / 'data' and path.is_dir()


@pytest.mark.parametrize('via', ['flag', 'env'])
def test_missing_given_dir_is_an_error_and_not_created(dirs, monkeypatch, via):
  missing = dirs[0].parent / 'missing'
  if via == 'env':
    monkeypatch.setenv(data_dir.ENV_VAR, str(missing))
  with pytest.raises(FileNotFoundError, match=data_dir.ENV_VAR):
    data_dir.resolve_data_dir(str(missing) if via == 'flag' else None, create_cache=True)
  assert not missing.exists()


def test_is_writable(tmp_path):
  assert data_dir.is_writable(tmp_path)
  assert data_dir.is_writable(tmp_path / 'not' / 'yet')  # Nearest existing parent decides.
  locked = tmp_path / 'locked'
  locked.mkdir()
  locked.chmod(0o555)
  try:
    assert not data_dir.is_writable(locked)  # Even for root.
    assert not data_dir.is_writable(locked / 'tfds')
  finally:
    locked.chmod(0o755)
