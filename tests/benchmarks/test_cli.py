"""The benchmarks' command lines (the benchmarks themselves are run by hand, see their README)."""
import pytest

from benchmarks import adapt_cost, vs_pytorch


@pytest.mark.parametrize('module', [adapt_cost, vs_pytorch])
def test_batch_per_model_and_override(module):
  args = module.parse_args(['--models', 'Ti/4@28,S/16@224', '--strategies', 'full'])
  assert args.batch_for == {'Ti/4@28': 32, 'S/16@224': 8}
  args = module.parse_args(['--models', 'Ti/4@28', '--batch', '4', '--strategies', 'full'])
  assert args.batch_for == {'Ti/4@28': 4}


@pytest.mark.parametrize('module', [adapt_cost, vs_pytorch])
def test_unknown_strategy_lists_the_valid_ones(module, capsys):
  with pytest.raises(SystemExit):
    module.parse_args(['--strategies', 'full,nope'])
  err = capsys.readouterr().err
  assert "unknown strategies ['nope']" in err and 'full' in err
