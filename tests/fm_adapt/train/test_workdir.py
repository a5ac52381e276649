"""A workdir belongs to one run: its lock and its config.json."""
import json
import os
import subprocess
import sys
import time

import pytest

from fm_adapt import config as config_lib
from fm_adapt.train import workdir as workdir_lib


def _config(**overrides):
  config = config_lib.base_config()
  config.input.update(dict(data=dict(name="npz", path="x.npz"), pp="value_range(-1,1)",
                           batch_size=16))
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def _trained(workdir, config):
  """A workdir as a run leaves it: config.json and a checkpoint step directory."""
  workdir_lib.check_config(workdir, config)
  (workdir / "ckpt" / "2").mkdir(parents=True)


def test_fresh_workdir_gets_config_json(tmp_path):
  workdir_lib.check_config(tmp_path, _config(lr=0.1))
  assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.1


def test_a_workdir_without_progress_takes_a_new_config(tmp_path):
  """A run that failed before saving anything may start again with another config."""
  workdir_lib.check_config(tmp_path, _config(lr=0.1))
  workdir_lib.check_config(tmp_path, _config(lr=0.2))
  assert json.loads((tmp_path / "config.json").read_text())["lr"] == 0.2


def test_resume_with_a_training_change_is_refused_and_config_json_kept(tmp_path):
  _trained(tmp_path, _config(lr=0.1, total_steps=10))
  before = (tmp_path / "config.json").read_text()
  new = _config(lr=0.2, total_steps=20, log_every=5)
  new.model = dict(variant="S/16")
  with pytest.raises(workdir_lib.ConfigChanged) as error:
    workdir_lib.check_config(tmp_path, new, allow_harmless_changes=True)
  message = str(error.value)
  assert "lr: stored 0.1, now 0.2" in message
  assert "total_steps: stored 10, now 20" in message
  assert 'model.variant: stored (absent), now "S/16"' in message
  assert "log_every: stored 50, now 5  [harmless]" in message
  assert str(tmp_path / "config.json") in message and "fresh --workdir" in message
  assert (tmp_path / "config.json").read_text() == before


def test_harmless_changes_need_the_flag(tmp_path, capsys):
  _trained(tmp_path, _config())
  new = _config(log_every=5, description="again", keep_ckpts=3)
  new.input.worker_count = 2
  with pytest.raises(workdir_lib.ConfigChanged, match="--allow_harmless_changes"):
    workdir_lib.check_config(tmp_path, new)
  workdir_lib.check_config(tmp_path, new, allow_harmless_changes=True)
  assert "harmless config change (input.worker_count: stored 0, now 2)" in capsys.readouterr().err
  assert json.loads((tmp_path / "config.json").read_text())["log_every"] == 50


def test_eval_every_is_not_harmless(tmp_path):
  _trained(tmp_path, _config())
  with pytest.raises(workdir_lib.ConfigChanged, match="eval_every: stored 0, now 7"):
    workdir_lib.check_config(tmp_path, _config(eval_every=7), allow_harmless_changes=True)


def test_a_key_older_config_json_lacks_is_accepted_at_its_default(tmp_path, capsys):
  _trained(tmp_path, _config())
  stored = json.loads((tmp_path / "config.json").read_text())
  del stored["keep_ckpts"], stored["wd"], stored["input"]["worker_count"]
  (tmp_path / "config.json").write_text(json.dumps(stored))
  workdir_lib.check_config(tmp_path, _config())  # All three at their base_config() default.
  err = capsys.readouterr().err
  assert "predates a config key" in err and "wd: stored (absent), now 0.0" in err
  with pytest.raises(workdir_lib.ConfigChanged, match="wd: stored \\(absent\\), now 0.1"):
    workdir_lib.check_config(tmp_path, _config(wd=0.1))


def test_a_key_the_config_lost_is_a_change(tmp_path):
  config = _config()
  config.input.eval_pp = "value_range(-1,1)"
  _trained(tmp_path, config)
  with pytest.raises(workdir_lib.ConfigChanged, match="input.eval_pp: stored .*, now \\(absent\\)"):
    workdir_lib.check_config(tmp_path, _config())


def test_lock_is_reentrant_in_a_process_and_released(tmp_path):
  with workdir_lib.lock(tmp_path):
    with workdir_lib.lock(tmp_path):  # A study locks a run, then trains it.
      assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
  with workdir_lib.lock(tmp_path):  # Released: taken again.
    pass


_HOLD = ("import sys, time\nfrom fm_adapt.train import workdir\n"
         "with workdir.lock(sys.argv[1]):\n  print('locked', flush=True)\n  time.sleep(600)\n")


def test_second_process_is_refused_and_a_dead_holder_blocks_nothing(tmp_path):
  holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    start = time.time()
    with pytest.raises(workdir_lib.WorkdirBusy, match=f"in use by process {holder.pid} "):
      with workdir_lib.lock(tmp_path):
        pass
    assert time.time() - start < 1
  finally:
    holder.kill()
    holder.wait()
  with workdir_lib.lock(tmp_path):  # The .lock file of a dead process blocks nothing.
    pass


def test_a_workdir_from_before_last_batch_was_trained_carrying_batches(tmp_path):
  """Before `input.last_batch` existed batches ran on across epochs: its default 'pad' changes
  training for such a workdir, 'carry' does not."""
  _trained(tmp_path, _config())
  stored = json.loads((tmp_path / "config.json").read_text())
  del stored["input"]["last_batch"]
  (tmp_path / "config.json").write_text(json.dumps(stored))
  with pytest.raises(workdir_lib.ConfigChanged, match='input.last_batch: stored \\(absent\\), now "pad"'):
    workdir_lib.check_config(tmp_path, _config())
  config = _config()
  config.input.last_batch = "carry"
  workdir_lib.check_config(tmp_path, config)
