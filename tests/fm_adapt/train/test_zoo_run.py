"""Runs from a catalogue model: `config.model_init = 'zoo:NAME:PATH'` builds the entry's ViT and
imports the file through the normal pretrained path (fm_adapt.train.model_fns / pretrained).

The catalogue's models are ViT-L/B/S at 224-518 px, far too slow here, so the catalogue is
replaced by reduced copies of its entries (`reduced_zoo`, as tests/fm_adapt/weights/test_zoo.py
does): the same family options (RETFound's global pool, class token and fc_norm; DINOv2's
LayerScale and registers), the same layout and dont_load, at 'mu' width and depth. The files are
written the way the models publish them (timm names; RETFound's MAE keys included).
"""
import dataclasses
import hashlib
import json
import os
import types

import jax
import numpy as np
import pytest
import safetensors.numpy
from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath

from fm_adapt import config as config_lib
from fm_adapt.train import loop, model_fns
from fm_adapt.weights import locate, readers, zoo

SPEC = types.SimpleNamespace(num_classes=2, task="multiclass")
WIDTH, DEPTH, MLP = 32, 2, 64  # The 'mu' variant.


def _reduce(entry, patch, image_size):
  model = dict(entry.model, variant=f"mu/{patch}", posemb_grid=image_size // patch)
  model.pop("proj_dim", None)
  return dataclasses.replace(entry, model=model, image_size=image_size)


@pytest.fixture()
def reduced_zoo(monkeypatch):
  reduced = {"retfound_cfp": _reduce(zoo.ENTRIES["retfound_cfp"], 16, 32),
             "dinov2_vits14_reg": _reduce(zoo.ENTRIES["dinov2_vits14_reg"], 14, 28)}
  monkeypatch.setattr(zoo, "ENTRIES", reduced)
  monkeypatch.setattr(zoo, "_ENTRIES", list(reduced.values()))
  return reduced


def _blocks(normal, sd):
  for i in range(DEPTH):
    for name, shape in [("norm1.weight", (WIDTH,)), ("norm1.bias", (WIDTH,)),
                        ("attn.qkv.weight", (3 * WIDTH, WIDTH)), ("attn.qkv.bias", (3 * WIDTH,)),
                        ("attn.proj.weight", (WIDTH, WIDTH)), ("attn.proj.bias", (WIDTH,)),
                        ("norm2.weight", (WIDTH,)), ("norm2.bias", (WIDTH,)),
                        ("mlp.fc1.weight", (MLP, WIDTH)), ("mlp.fc1.bias", (MLP,)),
                        ("mlp.fc2.weight", (WIDTH, MLP)), ("mlp.fc2.bias", (WIDTH,))]:
      sd[f"blocks.{i}.{name}"] = normal(*shape)


def retfound_file(path, grid=2, patch=16):
  """A RETFound / MAE pretraining file in timm's names (its MAE keys and final norm included)."""
  rng = np.random.default_rng(0)
  normal = lambda *shape: (0.1 * rng.normal(size=shape)).astype(np.float32)
  sd = {"cls_token": normal(1, 1, WIDTH), "pos_embed": normal(1, 1 + grid * grid, WIDTH),
        "patch_embed.proj.weight": normal(WIDTH, 3, patch, patch),
        "patch_embed.proj.bias": normal(WIDTH), "norm.weight": 1 + normal(WIDTH),
        "norm.bias": normal(WIDTH), "mask_token": normal(1, 1, WIDTH),
        "decoder_embed.weight": normal(16, WIDTH)}
  _blocks(normal, sd)
  safetensors.numpy.save_file(sd, str(path))
  return sd


def _run_config(tiny_data, model_init, **overrides):
  config = config_lib.base_config()
  config.model_init = model_init
  # Linear probe: the imported encoder stays as loaded, so the export shows what was imported.
  with config.ignore_type():
    config.schedule = [("head/.*", dict(decay_type="constant")), (".*", None)]
  config.input.update(dict(data=dict(name="npz", path=tiny_data["tiny"],
                                     tfds_dir=f"{tiny_data['root']}/tfds"),
                           pp="resize(32)|gray_to_rgb|value_range(-1,1)", batch_size=8,
                           eval_batch_size=32))
  config.data_dir = tiny_data["root"]
  config.evals.test = dict(name="classification", split="test")
  config.best_metric = "test/auc"
  config.total_steps = 2
  config.progress = False
  for key, value in overrides.items():
    config[key] = value
  return config


def test_a_run_from_zoo_name_and_path_imports_the_file(reduced_zoo, tiny_data, tmp_path,
                                                       capsys):
  path = tmp_path / "weights" / "retfound.safetensors"
  path.parent.mkdir()
  sd = retfound_file(path)
  config = _run_config(tiny_data, f"zoo:retfound_cfp:{path}", model=dict(dropout=0.1))
  results = loop.train_and_evaluate(config, tmp_path / "w")
  sha = hashlib.sha256(path.read_bytes()).hexdigest()
  assert results["base_checkpoint"] == {"path": str(path), "sha256": sha, "zoo": "retfound_cfp"}
  on_disk = json.loads((tmp_path / "w" / "results.json").read_text())
  assert on_disk["base_checkpoint"]["sha256"] == sha
  with np.load(results["export"], allow_pickle=False) as export:
    # The file's patch embedding [O, I, H, W] is the model's conv kernel [H, W, I, O].
    np.testing.assert_array_equal(export["params/embedding/kernel"],
                                  sd["patch_embed.proj.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(export["params/encoder/block_1/mlp/fc2/bias"],
                                  sd["blocks.1.mlp.fc2.bias"])
    # RETFound's fine-tuning starts fc_norm fresh (LayerNorm init), not from the file's norm.
    np.testing.assert_array_equal(export["params/fc_norm/scale"], np.ones(WIDTH))
    assert export["params/head/kernel"].shape == (WIDTH, 2)  # The dataset's head.
    assert not np.all(export["params/head/kernel"] == 0)  # Trained from its zero init.
  err = capsys.readouterr().err
  assert "Catalogue model 'retfound_cfp'" in err and "ignored: norm.weight" in err
  assert "kept its initialisation: fc_norm/scale" in err
  assert "kept its initialisation: head/kernel" in err



def _build(model_init, **overrides):
  config = config_lib.base_config()
  config.model_init = model_init
  for key, value in overrides.items():
    config[key] = value
  return model_fns.build_model(config, SPEC, (32, 32, 3))


def _load(fns):
  return fns.load(jax.tree.map(np.asarray, fns.init_fn(jax.random.key(0))))


def test_published_file_name_under_the_weights_dir(reduced_zoo, tmp_path, monkeypatch, capsys):
  torch = pytest.importorskip("torch", reason="torch is optional; .pth files need it")
  sd = retfound_file(tmp_path / "sd.safetensors")
  torch.save({"model": {k: torch.from_numpy(v) for k, v in sd.items()}},
             str(tmp_path / "RETFound_cfp_weights.pth"))
  monkeypatch.setenv("FM_ADAPT_WEIGHTS_DIR", str(tmp_path))
  fns = _build("zoo:RETFound_cfp_weights.pth", model=dict(posemb_resize="bicubic"))
  assert fns.base["zoo"] == "retfound_cfp"
  assert fns.base["path"] == str(tmp_path / "RETFound_cfp_weights.pth")
  assert fns.model.pool_type == "gap" and fns.model.fc_norm and fns.model.num_classes == 2
  assert fns.model.posemb_resize == "bicubic"  # The user's config.model wins, and says so.
  assert ("overrides the catalogue model 'retfound_cfp': posemb_resize='bicubic' (catalogue: "
          "'bicubic_antialias')") in capsys.readouterr().err
  params = _load(fns)["params"]
  np.testing.assert_array_equal(params["encoder"]["block_0"]["mlp"]["fc1"]["kernel"],
                                sd["blocks.0.mlp.fc1.weight"].T)


def test_unknown_zoo_name_lists_the_catalogue():
  with pytest.raises(ValueError, match=r"Unknown foundation model 'retfund'.*'dinov2_vitb14'.*"
                                       r"'retfound_cfp'"):
    _build("zoo:retfund:/w/RETFound_cfp_weights.pth")


def test_zoo_model_name_and_loader_conflicts_are_clear(reduced_zoo, tmp_path):
  path = tmp_path / "r.safetensors"
  retfound_file(path)
  with pytest.raises(ValueError, match=r"catalogue model 'retfound_cfp', a ViT, but "
                                       r"config.model_name='resnet': set config.model_name='vit'"):
    _build(f"zoo:retfound_cfp:{path}", model_name="resnet")
  with pytest.raises(ValueError, match=r"model_load.name='timm', but the catalogue model "
                                       r"'retfound_cfp' is read with its own layout 'retfound'"):
    _build(f"zoo:retfound_cfp:{path}", model_load=dict(name="timm"))


def test_a_file_of_another_catalogue_model_says_which_one(reduced_zoo, tiny_data, tmp_path):
  path = tmp_path / "weights.safetensors"
  retfound_file(path)
  config = _run_config(tiny_data, f"zoo:dinov2_vits14_reg:{path}")
  config.input.pp = "resize(28)|gray_to_rgb|value_range(-1,1)"  # Patch 14.
  with pytest.raises(zoo.vit_import.CheckpointMismatchError) as error:
    loop.train_and_evaluate(config, tmp_path / "w")
  message = str(error.value)
  assert "is not a 'dinov2_vits14_reg' checkpoint" in message
  assert f"It fits the catalogue model(s) ['retfound_cfp']: write zoo:retfound_cfp:{path}" in message


class _ReadOnlyBucket(epath_backend.Backend):
  """gs://<bucket>/<key> read from <root>/<bucket>/<key>; nothing is written through it."""

  def __init__(self, root):
    self.root, self.disk = root, epath_backend.os_backend

  def _local(self, path):
    path = os.fspath(path)
    assert path.startswith("gs://"), path
    return os.path.join(self.root, path[len("gs://"):])

  def open(self, path, mode):
    assert set(mode) <= set("rb"), mode
    return self.disk.open(self._local(path), mode)

  def exists(self, path):
    return self.disk.exists(self._local(path))

  def isdir(self, path):
    return self.disk.isdir(self._local(path))

  def stat(self, path):
    return self.disk.stat(self._local(path))

  def _refuse(self, *args, **kwargs):
    raise NotImplementedError("read-only fake bucket")

  listdir = glob = walk = makedirs = mkdir = rmtree = remove = rename = replace = copy = _refuse


@pytest.fixture()
def bucket(tmp_path, monkeypatch):
  """A fake gs://bucket (local folder) for epath; the working directory is an empty folder, so
  a URI that slipped through pathlib ('gs:/bucket/...') would show up there."""
  root = tmp_path / "fake_gcs"
  (root / "bucket").mkdir(parents=True)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # Else epath uses tf.io.gfile.
  monkeypatch.setitem(gpath._PREFIX_TO_BACKEND, "gs", _ReadOnlyBucket(str(root)))  # pylint: disable=protected-access
  (tmp_path / "cwd").mkdir()
  monkeypatch.chdir(tmp_path / "cwd")
  yield root / "bucket"
  assert os.listdir(tmp_path / "cwd") == []


def test_gs_checkpoints_resolve_hash_and_load_through_epath(reduced_zoo, bucket, monkeypatch):
  sd = retfound_file(bucket / "retfound.safetensors")
  uri = "gs://bucket/retfound.safetensors"
  path = locate.resolve_path(uri)
  assert isinstance(path, epath.Path) and str(path) == uri
  assert locate.file_sha256(uri) == hashlib.sha256(
      (bucket / "retfound.safetensors").read_bytes()).hexdigest()
  assert sorted(readers.read_arrays(uri)) == sorted(sd)
  fns = _build(f"zoo:retfound_cfp:{uri}")
  assert fns.base["path"] == uri and fns.base["zoo"] == "retfound_cfp"
  np.testing.assert_array_equal(_load(fns)["params"]["embedding"]["bias"],
                                sd["patch_embed.proj.bias"])
  # The weights dir may be a bucket too; an .npz there is read (keys listed, loaded) via epath.
  np.savez(bucket / "plain.npz", **{k.replace(".", "_"): v for k, v in sd.items()})
  monkeypatch.setenv("FM_ADAPT_WEIGHTS_DIR", "gs://bucket")
  assert str(locate.resolve_path("plain.npz")) == "gs://bucket/plain.npz"
  assert readers.list_keys("gs://bucket/plain.npz")[0] == "cls_token"
  with pytest.raises(ValueError, match="'gs://bucket/retfound.safetensors'"):
    locate.resolve_path("gs:/bucket/retfound.safetensors")  # pathlib's collapsed URI.
  with pytest.raises(FileNotFoundError, match="FM_ADAPT_WEIGHTS_DIR=gs://bucket"):
    locate.resolve_path("missing.npz")


def test_adaptation_parameters_keep_their_init_beside_the_catalogue_load(reduced_zoo, tmp_path):
  path = tmp_path / "r.safetensors"
  sd = retfound_file(path)
  fns = _build(f"zoo:retfound_cfp:{path}", adapt=[dict(name="ept", num_tokens=2)],
               model_load=dict(dont_load=["head/.*"]))  # Also kept by the catalogue path.
  init = jax.tree.map(np.asarray, fns.init_fn(jax.random.key(0)))
  params = fns.load(init)["params"]
  np.testing.assert_array_equal(params["prompt"]["ept"], init["params"]["prompt"]["ept"])
  assert params["prompt"]["ept"].shape == (DEPTH, 1 + 4, 2)  # [L, cls + 2x2 patches, n]
  np.testing.assert_array_equal(params["encoder"]["block_1"]["attn"]["out"]["bias"],
                                sd["blocks.1.attn.proj.bias"])
