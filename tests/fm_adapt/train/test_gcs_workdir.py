"""Workdirs on an object store: `gs://bucket/run` stays that string everywhere, and a run trains,
checkpoints, resumes, writes its results and exports there, on a fake bucket (no network).

The fake (`fake_gcs`) is an `etils.epath` backend for `gs://` that keeps objects under a local
folder and, like an object store, refuses to append to an object. epath sends every gs:// call
of fm_adapt, orbax, grain and the predictions writer to it. Two things do not go through
epath, and the fixture redirects them into the same folder: tensorstore's own GCS client (orbax
names it in `get_kvstore_for_gcs`; here a `file` kvstore) and orbax's google-cloud-storage query
of the bucket's namespace (here: a flat bucket). TensorBoard files (tensorboardX's own
google-cloud-storage writer) are not covered: without that package the run says it writes none.
The working directory is an empty folder, so a path that slipped out of epath (pathlib turns
`gs://bucket/run` into the local `gs:/bucket/run`) shows up there as `gs:`.
"""
import json
import os
import types

import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from orbax.checkpoint._src.path import gcs_utils

from fm_adapt import study
from fm_adapt.train import checkpoint as ckpt_lib
from fm_adapt.train import files
from fm_adapt.train import interrupt
from fm_adapt.train import loop
from fm_adapt.train import workdir as workdir_lib
from fm_adapt.train import writer as writer_lib
from fm_adapt.weights import native

RUN = "gs://bucket/run"


class _FakeBucketBackend(epath_backend.Backend):
  """gs://<bucket>/<key> kept at <root>/<bucket>/<key> (through epath's local backend); objects
  cannot be appended to."""

  def __init__(self, root: str):
    self.root = root
    self.disk = epath_backend.os_backend

  def _local(self, path) -> str:
    path = os.fspath(path)
    assert path.startswith("gs://"), path
    return os.path.join(self.root, path[len("gs://"):])

  def _uri(self, local) -> str:
    return "gs://" + os.path.relpath(os.fspath(local), self.root)

  def open(self, path, mode):
    if "a" in mode or "+" in mode:
      raise NotImplementedError(f"{path}: an object store cannot open {mode!r}")
    return self.disk.open(self._local(path), mode)

  def exists(self, path):
    return self.disk.exists(self._local(path))

  def isdir(self, path):
    return self.disk.isdir(self._local(path))

  def listdir(self, path):
    return self.disk.listdir(self._local(path))

  def glob(self, path):
    return [self._uri(p) for p in self.disk.glob(self._local(path))]

  def walk(self, top, *, top_down=True, on_error=None):
    for root, dirs, names in self.disk.walk(self._local(top), top_down=top_down,
                                            on_error=on_error):
      yield self._uri(root), dirs, names

  def makedirs(self, path, *, exist_ok=False, mode=None):
    return self.disk.makedirs(self._local(path), exist_ok=exist_ok)

  def mkdir(self, path, *, exist_ok=False, mode=None):
    return self.disk.mkdir(self._local(path), exist_ok=exist_ok)

  def rmtree(self, path):
    return self.disk.rmtree(self._local(path))

  def remove(self, path):
    return self.disk.remove(self._local(path))

  def rename(self, path, dst):
    return self.disk.rename(self._local(path), self._local(dst))

  def replace(self, path, dst):
    return self.disk.replace(self._local(path), self._local(dst))

  def copy(self, path, dst, overwrite):
    return self.disk.copy(self._local(path), self._local(dst), overwrite=overwrite)

  def stat(self, path):
    return self.disk.stat(self._local(path))


@pytest.fixture()
def fake_gcs(tmp_path, monkeypatch):
  """The fake bucket's folder; the working directory is the empty folder `<tmp>/cwd`."""
  root = tmp_path / "fake_gcs"
  root.mkdir()
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # Else epath uses tf.io.gfile.
  backends = gpath._PREFIX_TO_BACKEND  # pylint: disable=protected-access
  monkeypatch.setitem(backends, "gs", _FakeBucketBackend(str(root)))

  def kvstore(path):
    bucket, key = gcs_utils.parse_gcs_path(path, add_trailing_slash=False)
    return {"driver": "file", "path": os.path.join(root, bucket, key)}

  monkeypatch.setattr(gcs_utils, "get_kvstore_for_gcs", kvstore)
  monkeypatch.setattr(gcs_utils, "get_bucket",
                      lambda name: types.SimpleNamespace(hierarchical_namespace_enabled=False))
  monkeypatch.setattr(workdir_lib, "missing_packages", lambda workdir: {})  # It stands in for them.
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  return root


def _nothing_escaped(tmp_path) -> bool:
  return os.listdir(tmp_path / "cwd") == []


def test_a_gs_uri_survives_every_path_function_as_a_string(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = files.as_path(RUN)
  assert os.fspath(path) == str(path) == RUN and str(path / "results.json") == RUN + "/results.json"
  assert str(files.as_path(path)) == RUN and not files.is_local(path)
  assert str(files.as_path("rel/w")) == str(tmp_path / "rel" / "w")  # Local: made absolute.
  # What pathlib makes of the URI is refused, naming the string to pass instead.
  with pytest.raises(ValueError, match="'gs://bucket/run'"):
    files.as_path("gs:/bucket/run")


def test_workdir_storage_is_checked_before_anything_is_written(tmp_path, tiny_config, monkeypatch):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(workdir_lib.WorkdirError, match="s3://, where orbax cannot write"):
    workdir_lib.check_storage("s3://bucket/run")
  monkeypatch.setattr(workdir_lib, "_installed", lambda module: False)
  with pytest.raises(workdir_lib.WorkdirError,
                     match="pip install gcsfs google-cloud-storage$"):
    loop.train_and_evaluate(tiny_config(), RUN)
  workdir_lib.check_storage(tmp_path / "local")  # A local workdir needs nothing more.
  assert os.listdir(tmp_path) == []


def test_small_files_go_to_the_object_whole_and_without_fsync(fake_gcs, tmp_path, monkeypatch):
  monkeypatch.setattr(os, "fsync", lambda fd: pytest.fail("fsync on an object store"))
  files.write_json(RUN + "/results.json", {"auc": float("nan")})
  assert json.loads((fake_gcs / "bucket" / "run" / "results.json").read_text()) == {"auc": None}
  with pytest.raises(RuntimeError, match="interrupted"):
    with files.whole_file(RUN + "/results.json") as f:
      f.write(b"{half")
      raise RuntimeError("interrupted")
  assert json.loads(epath.Path(RUN + "/results.json").read_text()) == {"auc": None}
  assert os.listdir(fake_gcs / "bucket" / "run") == ["results.json"]  # No temp object.
  assert _nothing_escaped(tmp_path)


def test_a_gs_workdir_is_not_locked_and_says_so_once(fake_gcs, tmp_path, capsys):
  with workdir_lib.lock(RUN):
    with workdir_lib.lock(RUN):  # A study locks a run, then trains it.
      pass
  err = capsys.readouterr().err
  warning = "Warning: gs://bucket/run is not on a local filesystem, so it is not locked"
  assert err.count(warning) == 1
  assert not (fake_gcs / "bucket" / "run" / workdir_lib.LOCK_NAME).exists()
  assert _nothing_escaped(tmp_path)


def test_metrics_are_rewritten_whole_on_an_object_store(fake_gcs, tmp_path, capsys):
  writer = writer_lib.MetricWriter(RUN)
  assert "Warning: no TensorBoard files in gs://bucket/run/tb" in capsys.readouterr().err
  for step in (1, 2, 3):
    writer.write(step, {"train/loss": 1.0 / step})
  writer.close()
  resumed = writer_lib.MetricWriter(RUN, tensorboard=False, resume_step=2)
  resumed.write(3, {"train/loss": 0.25})
  assert [r["step"] for r in writer_lib.read_metrics(RUN)] == [1, 2, 3]
  assert writer_lib.read_metrics(RUN)[-1]["train/loss"] == 0.25
  assert _nothing_escaped(tmp_path)


def test_an_unreadable_checkpoint_is_set_aside_within_the_bucket(fake_gcs, tmp_path, capsys):
  state = {"params": {"w": jnp.ones(3)}, "model_state": {}, "step": jnp.int32(0)}
  ckpt = ckpt_lib.RunCheckpointer(RUN, keep=3)
  for step in (2, 4):
    ckpt.save(step, dict(state, step=jnp.int32(step)), {"base_checkpoint": None})
  ckpt.wait()

  def check(step, restored, data):
    if step == 4:
      raise ValueError("refused")

  assert ckpt.restore_latest(ckpt_lib.abstract_of(state), check)[2] == 2
  err = capsys.readouterr().err
  assert "checkpoint gs://bucket/run/ckpt/4 cannot be restored (ValueError: refused)" in err
  assert "moved the unreadable checkpoint of step 4 to gs://bucket/run/corrupt/ckpt_4" in err
  assert (fake_gcs / "bucket" / "run" / "corrupt" / "ckpt_4").is_dir()
  assert sorted(os.listdir(fake_gcs / "bucket" / "run" / "ckpt")) == ["2"]
  ckpt.close()
  assert _nothing_escaped(tmp_path)


def _stop_at(step: int):
  def requested(self, at: int) -> bool:
    self.signum = 15
    return at == step
  return requested


def test_a_run_in_a_gs_workdir_trains_resumes_and_exports(fake_gcs, tmp_path, tiny_config,
                                                          monkeypatch, capsys):
  config = tiny_config()
  with monkeypatch.context() as patch:
    patch.setattr(interrupt.StopOnSignal, "requested", _stop_at(2))
    with pytest.raises(interrupt.Stopped):
      loop.train_and_evaluate(config, RUN)
  bucket_run = fake_gcs / "bucket" / "run"
  assert sorted(os.listdir(bucket_run / "ckpt")) == ["2"]
  assert (bucket_run / "ckpt" / "2" / "commit_success.txt").exists()  # orbax's gs:// commit.
  capsys.readouterr()
  results = loop.train_and_evaluate(config, RUN)  # The same command resumes.
  err = capsys.readouterr().err
  assert "Resuming from gs://bucket/run/ckpt/2" in err
  assert "not locked" in err and "no TensorBoard files in gs://bucket/run/tb" in err
  assert results["export"] == RUN + "/export/model.npz" and results["total_steps"] == 4
  assert json.loads((bucket_run / "results.json").read_text())["metrics"] == results["metrics"]
  assert json.loads((bucket_run / "config.json").read_text())["total_steps"] == 4
  assert [r["step"] for r in writer_lib.read_metrics(RUN) if "train/loss" in r] == [1, 2, 3, 4]
  assert (bucket_run / "predictions" / "test.csv").exists()
  assert sorted(os.listdir(bucket_run / "ckpt")) == ["2", "4"]
  exported = native.load_native(results["export"])
  assert np.isfinite(exported["params"]["head"]["kernel"]).all()
  ckpt = ckpt_lib.RunCheckpointer(RUN)
  assert str(ckpt.directory) == RUN + "/ckpt" and ckpt.latest_step() == 4
  ckpt.close()
  assert not list(bucket_run.rglob("*.tmp")) and _nothing_escaped(tmp_path)


_BASE_AND_ADAPTED = """
    def sweep(add, arg=None):
      add(name="base")
      add(name="adapted", model_init="run:base")
"""


def test_a_study_in_a_gs_workdir_skips_finished_runs_and_finds_run_references(
    fake_gcs, tmp_path, tiny_experiment):
  calls = []

  def train(config, run_dir, data_dir, allow_harmless_changes):
    calls.append((str(run_dir), config.get("model_init")))
    workdir_lib.check_config(run_dir, config)
    native.save_native(run_dir / "export" / "model.npz", {"params": {"w": np.ones(2)}})
    result = {"metrics": {"test/auc": 0.5}, "trainable_params": 2, "data": {"variant": "tiny"}}
    files.write_json(run_dir / "results.json", result)
    return result

  exp = str(tiny_experiment(_BASE_AND_ADAPTED))
  markdown = study.run_study(exp, "gs://bucket/study", train=train)
  assert calls == [("gs://bucket/study/base-s0", None),
                   ("gs://bucket/study/adapted-s0", "gs://bucket/study/base-s0/export/model.npz")]
  assert "| base | 1 |" in markdown
  assert (fake_gcs / "bucket" / "study" / "results.md").read_text() == markdown + "\n"
  study.run_study(exp, "gs://bucket/study", train=lambda *a: pytest.fail(f"trained {a}"))
  assert _nothing_escaped(tmp_path)
