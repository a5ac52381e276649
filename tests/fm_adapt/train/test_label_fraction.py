"""`config.input.label_fraction` on the synthetic data of tests/fm_adapt/conftest.py (40 train
examples, 20 of each class): the run trains on the stratified subset, counts its epochs over it,
records it in results.json, and resumes onto the same subset."""
import shutil

import numpy as np
import orbax.checkpoint as ocp
import pytest

from data_pipelines import datasets, subsets
from fm_adapt.train import build
from fm_adapt.train import loop


def _fraction_config(tiny_config, fraction=0.25, **overrides):
  config = tiny_config(**overrides)
  config.input.label_fraction = fraction
  return config


def _raw_train(config):
  source, _ = datasets.get_dataset(config.input.data, "train", config.data_dir)
  images = np.stack([source[i]["image"] for i in range(len(source))])
  labels = np.asarray([source[i]["label"] for i in range(len(source))])
  return images, labels


def test_training_loader_yields_exactly_the_stratified_subset(tiny_config, tiny_data):
  config = _fraction_config(tiny_config, seed=3)
  run = build.build_run(config, config.data_dir)
  images, labels = _raw_train(config)
  want = subsets.stratified_subset(labels, 0.25, seed=3)
  assert run.num_train_examples == want.size == 10 and run.steps_per_epoch == 1
  assert run.train_class_counts == {"0": 5, "1": 5} and run.label_fraction == 0.25
  # Two epochs of the loader: every real example is one of the subset's, each once per epoch.
  iterator = iter(run.train_loader)
  for _ in range(2):
    batch = next(iterator)
    real = batch["image"][batch["mask"]]
    assert real.shape[0] == 10
    # pp is value_range(-1, 1): x / 127.5 - 1 -> back to uint8.
    seen = {np.rint((x + 1) * 127.5).astype(np.uint8).tobytes() for x in real}
    assert seen == {images[i].tobytes() for i in want}
  assert tiny_data["sizes"]["train"] == 40


def test_the_whole_split_is_recorded_by_default(tmp_path, tiny_config):
  results = loop.train_and_evaluate(tiny_config(total_steps=1), tmp_path / "w")
  assert results["label_fraction"] == 1.0 and results["num_train_examples"] == 40
  assert results["train_class_counts"] == {"0": 20, "1": 20}


def _final_state(workdir, step=4):
  return ocp.tree.to_flat_dict(ocp.StandardCheckpointer().restore(
      workdir / "ckpt" / str(step) / "state"))


def test_results_record_the_subset_and_resume_recomputes_it(tmp_path, tiny_config, capsys):
  config, workdir = _fraction_config(tiny_config, seed=1), tmp_path / "w"
  results = loop.train_and_evaluate(config, workdir)  # Checkpoints at steps 2 and 4.
  assert results["label_fraction"] == 0.25 and results["num_train_examples"] == 10
  assert results["train_class_counts"] == {"0": 5, "1": 5}
  assert results["metrics"]["test/num_examples"] == 30  # Evaluation splits are whole.
  assert results["metrics"]["val/num_examples"] == 20
  want = _final_state(workdir)
  (workdir / "results.json").unlink()  # As if killed before step 4 was saved.
  shutil.rmtree(workdir / "ckpt" / "4")
  capsys.readouterr()
  results = loop.train_and_evaluate(_fraction_config(tiny_config, seed=1), workdir)
  assert f"Resuming from {workdir / 'ckpt' / '2'}" in capsys.readouterr().err
  assert results["resumed_from_step"] == 2 and results["num_train_examples"] == 10
  assert results["train_class_counts"] == {"0": 5, "1": 5}
  got = _final_state(workdir)
  assert want.keys() == got.keys()
  for key in want:
    np.testing.assert_array_equal(want[key], got[key], err_msg=str(key))


def test_a_changed_fraction_is_refused_on_resume(tmp_path, tiny_config):
  workdir = tmp_path / "w"
  loop.train_and_evaluate(_fraction_config(tiny_config, total_steps=2), workdir)
  with pytest.raises(loop.workdir_lib.ConfigChanged, match="input.label_fraction"):
    loop.train_and_evaluate(_fraction_config(tiny_config, 0.5, total_steps=2), workdir)


def test_training_subset_of_a_multilabel_split():
  rng = np.random.default_rng(0)
  labels = (rng.random((60, 4)) < [0.5, 0.2, 0.05, 0.0]).astype(np.int64)
  source = [{"image": np.full((2, 2, 1), i, np.uint8), "label": labels[i]} for i in range(60)]
  spec = type("Spec", (), dict(task="multilabel", num_classes=4, class_names=tuple("abcd")))
  subset, counts = build.training_subset(source, spec, 0.5, seed=2)
  want = subsets.stratified_subset(labels, 0.5, seed=2)
  assert [int(subset[i]["image"][0, 0, 0]) for i in range(len(subset))] == want.tolist()
  assert counts == dict(zip("abcd", labels[want].sum(axis=0).tolist()))
  assert counts["c"] >= 1 and counts["d"] == 0  # Every label with a positive is kept.
  whole, all_counts = build.training_subset(source, spec, 1.0, seed=2)
  assert whole is source and all_counts == dict(zip("abcd", labels.sum(axis=0).tolist()))


def test_a_single_class_split_is_counted_without_reading_it():
  class Unreadable(list):
    def __getitem__(self, index):
      raise AssertionError("read an example")

  spec = type("Spec", (), dict(task="multiclass", num_classes=1, class_names=("unlabelled",)))
  source = Unreadable(range(7))
  assert build.training_subset(source, spec, 1.0, seed=0) == (source, {"unlabelled": 7})
