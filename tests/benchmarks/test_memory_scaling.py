"""benchmarks.memory_scaling on a tiny ViT: per-device bytes come from the real shardings.

Runs the benchmark's command in a subprocess (the simulated device count is fixed at JAX
start-up).
"""
import json
import subprocess
import sys
import types

import numpy as np
import pytest

from benchmarks import memory_scaling


def test_tiny_vit_fsdp_divides_the_state_across_devices(tmp_path):
  result = subprocess.run(
      [sys.executable, '-m', 'benchmarks.memory_scaling', '--model', 'mu/4@16', '--fsdp', '4',
       '--out', str(tmp_path)], capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  record = json.loads((tmp_path / 'memory_scaling.json').read_text())
  one, four = record['records']
  assert (one['devices'], four['devices']) == (1, 4)
  assert four['mesh'] == {'data': 1, 'fsdp': 4}
  # The whole state is the same; one device holds all of it, each of 4 about a quarter.
  assert one['params'] == one['params_total'] == four['params_total']
  assert one['opt'] == one['opt_total'] == four['opt_total']
  assert one['params'] == 4 * one['num_params']  # float32.
  assert record['ratio'] == pytest.approx(
      (four['params'] + four['opt']) / (one['params'] + one['opt']))
  assert 0.25 <= record['ratio'] < 0.26  # All of mu's leaves divide by 4; Adam's count does not.
  # XLA's own per-device argument bytes agree: the state shard plus the batch shard and key.
  for r in (one, four):
    batch_bytes = r['batch'] * (16 * 16 * 3 * 4 + 4 + 1) // r['devices']
    assert r['params'] + r['opt'] <= r['xla']['argument'] <= (
        r['params'] + r['opt'] + batch_bytes + 64)
  table = (tmp_path / 'memory_scaling.md').read_text()
  assert 'data 1 x fsdp 4' in table and 'not judged: the target is for fsdp >= 8' in table


def test_bad_model_spec_is_a_usage_error(capsys):
  with pytest.raises(SystemExit):
    memory_scaling.parse_args(['--model', 'L/16'])
  assert "--model must look like 'L/16@224'" in capsys.readouterr().err


def test_per_device_bytes_reads_the_shard_shape():
  """A leaf split 4 ways along its first dimension counts a quarter of its bytes."""
  split = types.SimpleNamespace(shard_shape=lambda shape: (shape[0] // 4, *shape[1:]))
  leaf = types.SimpleNamespace(shape=(8, 6), dtype=np.float32, sharding=split)
  assert memory_scaling.per_device_bytes({'w': leaf, 'v': leaf}) == 2 * 2 * 6 * 4
  assert memory_scaling.total_bytes({'w': leaf}) == 8 * 6 * 4
