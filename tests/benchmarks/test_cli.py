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


def test_speed_targets_are_judged_only_on_a_quiet_machine():
  """Under load the step-time verdict is withheld; byte targets are judged either way."""
  from benchmarks import adapt_cost
  assert adapt_cost._speed_verdict(True, (0.4, 1.2)) == 'MET'
  assert adapt_cost._speed_verdict(False, (0.4, 1.2)) == 'MISSED'
  verdict = adapt_cost._speed_verdict(True, (1.0, 3.6))
  assert verdict.startswith('not judged: measured under load (load average 1.0-3.6')
