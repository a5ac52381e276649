"""Tests of config parsing and validation."""
import ml_collections
import pytest

from fm_adapt import config as config_lib


def test_parse_arg_literals_and_flags():
  arg = config_lib.parse_arg("lr=3e-4,runlocal,name=abc", lr=1e-3, runlocal=False, name="x")
  assert arg.lr == 3e-4 and arg.runlocal is True and arg.name == "abc"


def test_parse_arg_unknown_key_lists_valid():
  with pytest.raises(ValueError, match=r"valid: \['lr', 'runlocal'\]"):
    config_lib.parse_arg("lrr=1", lr=1e-3, runlocal=False)


def test_validate_unknown_keys():
  config = ml_collections.ConfigDict(dict(lr=1.0, learning_rate=2.0, input=dict(batch_size=2)))
  with pytest.raises(ValueError, match=r"Unknown config key\(s\) \['learning_rate'\]"):
    config_lib.validate(config)
  config = ml_collections.ConfigDict(dict(lr=1.0, input=dict(batchsize=2)))
  with pytest.raises(ValueError, match="batchsize"):
    config_lib.validate(config)
