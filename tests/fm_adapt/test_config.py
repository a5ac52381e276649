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


@pytest.mark.parametrize("key, value", [
    ("input.batch_size", 0),  # Was a ZeroDivisionError while setting up the run.
    ("input.batch_size", -8),
    ("input.eval_batch_size", 0),  # Was found at the first evaluation, after training.
    ("evals.val.batch_size", 0),
])
def test_validate_batch_sizes_name_the_key_and_the_fix(key, value):
  config = config_lib.base_config()
  config.input.update(dict(data=dict(name="npz", path="x.npz"), pp="", batch_size=8))
  config.evals.val = dict(name="classification", split="val")
  config_lib.validate(config)
  parent, leaf = key.rsplit(".", 1)
  node = config
  for part in parent.split("."):
    node = node[part]
  with node.unlocked():
    node[leaf] = value
  with pytest.raises(ValueError, match=rf"config.{key}={value!r}: set it to a positive int"):
    config_lib.validate(config)


def test_validate_needs_a_batch_size():
  config = config_lib.base_config()
  config.input.update(dict(data=dict(name="npz", path="x.npz"), pp=""))
  with pytest.raises(ValueError, match="config.input.batch_size=None: set it to a positive int"):
    config_lib.validate(config)


def test_key_docs_match_base_config():
  """Every key of base_config is documented in RUN_KEYS / INPUT_KEYS, and every documented key
  exists in base_config (so `--config.<key>=...` works for each)."""
  config = config_lib.base_config()
  assert set(config.keys()) == set(config_lib.RUN_KEYS)
  documented_input = set(config_lib.INPUT_KEYS)
  assert set(config.input.keys()) <= documented_input


def test_input_keys_are_validated_against_their_docs():
  config = config_lib.base_config()
  config.input.batch_size = 8
  config.input.shuffle_buffer = 10
  with pytest.raises(ValueError, match=r"Unknown config.input key\(s\) \['shuffle_buffer'\]"):
    config_lib.validate(config)


def _valid_config():
  config = config_lib.base_config()
  config.input.update(dict(data=dict(name="npz", path="x.npz"), pp="", batch_size=8))
  return config


@pytest.mark.parametrize("key, value, match", [
    ("dtype", "float16", r"Unknown config.dtype 'float16'; valid: \['float32', 'bfloat16'\]"),
    ("dtype", "bf16", r"Unknown config.dtype 'bf16'; valid:"),
    ("remat", "yes", r"config.remat='yes': set it to True or False"),
    ("grad_accum_steps", 0, r"config.grad_accum_steps=0: set it to a positive int"),
    ("grad_accum_steps", 3, r"batch_size=8 is not divisible by config.grad_accum_steps=3"),
])
def test_validate_precision_and_accumulation_keys(key, value, match):
  config = _valid_config().to_dict()  # A plain dict: a ConfigDict would refuse the wrong type.
  config_lib.validate(config)
  config[key] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)


def test_precision_and_accumulation_keys_accept_their_valid_values():
  config = _valid_config()
  config.dtype, config.remat, config.grad_accum_steps = "bfloat16", True, 4
  config_lib.validate(config)


@pytest.mark.parametrize("value", [0, 0.0, -0.5, 1.5, float("nan"), "0.1", True])
def test_label_fraction_outside_0_1_is_an_error_naming_the_key(value):
  config = _valid_config().to_dict()
  config["input"]["label_fraction"] = value
  with pytest.raises(ValueError, match=r"config.input.label_fraction=.*: set it to a number in "
                                       r"\(0, 1\]"):
    config_lib.validate(config)


def test_label_fraction_defaults_to_the_whole_split_and_takes_valid_values():
  config = _valid_config()
  assert config.input.label_fraction == 1.0
  for value in (1.0, 0.25, 1e-3, 1):
    config.input.label_fraction = value
    config_lib.validate(config)
  assert config_lib.check_label_fraction(None) == 1.0


def test_parse_arg_keeps_the_text_of_a_string_argument():
  arg = config_lib.parse_arg("fractions=0.1,seeds=2,name=3e-1", fractions="0.01+1.0", seeds=3,
                             name="x")
  assert (arg.fractions, arg.seeds, arg.name) == ("0.1", 2, "3e-1")
