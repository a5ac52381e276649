"""The 'reconstruction' evaluator: how well a MIM model reconstructs held-out images, in numbers
and in pictures.

  config.evals.recon = dict(name='reconstruction', split='val',
                            data=dict(name='medmnist', flag='pneumoniamnist', size=28,
                                      allow_download=False),
                            pp='gray_to_rgb|value_range(-1,1)', num_images=8)

For a run whose objective is a masked-image-modelling one (`config.loss.name` in
`fm_adapt.objectives.mim.NAMES`). Pretraining data has no held-out split (the
'pretrain_mixture' holds training images only), so the option `data` names the dataset whose
`split` is evaluated (default: `config.input.data`); choose a split that never enters
pretraining (validation or test). The entry's pp must give the training images' shape.

Each call yields
  loss          the objective's own loss over every image of the split, the model in inference
                mode, each batch with the same corruption draw at every call (key `seed` folded
                with the batch index), so that values at different steps compare like with like;
  num_examples  the images it covers;
and, when the training loop gives it the workdir (`WRITES_FILES`; process 0 writes), the picture
of the first `num_images` images of the split in three rows, input / model input (the
objective's corruption, masked patches at 0) / reconstruction (`MimObjective.views`, one fixed
draw), each image shown on its input's value range:
  <workdir>/reconstructions/step_<N>.png   at each periodic evaluation,
  <workdir>/reconstructions/final.png      at the final evaluation (the selected state),
and at the final evaluation `<workdir>/loss_curve.png`: `train/loss` and `<key>/loss` of
`<workdir>/metrics.jsonl` against the step.
"""
from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from jax.experimental import multihost_utils

from fm_adapt.report import plots
from fm_adapt.train import state as state_lib

if TYPE_CHECKING:
  from fm_adapt.evaluators import EvalData


def _to_host(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _inference(apply_fn: Callable[..., Any], *args: Any, train: bool, **kwargs: Any) -> Any:
  """`apply_fn` with the model in inference mode (no dropout, statistics unchanged)."""
  del train
  return apply_fn(*args, train=False, **kwargs)


def batch_loss(objective: Any, apply_fn: Callable[..., Any], train_state: Mapping[str, Any],
               batch: Mapping[str, jax.Array], rng: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(the objective's loss on a batch with the model in inference mode, its real rows)."""
  loss, _, _ = objective(functools.partial(_inference, apply_fn),
                         state_lib.full_params(train_state), train_state["model_state"], batch,
                         rng)
  return loss, jnp.sum(batch["mask"].astype(jnp.float32))


def display_range(views: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Each view mapped to [0, 1] with the value range of its input image (clipped)."""
  images = np.asarray(views["input"], np.float32)
  lo = images.min(axis=(1, 2, 3), keepdims=True)
  hi = images.max(axis=(1, 2, 3), keepdims=True)
  scale = np.where(hi > lo, hi - lo, 1.0)
  return {k: np.clip((np.asarray(v, np.float32) - lo) / scale, 0.0, 1.0)
          for k, v in views.items()}


def read_curves(metrics_path: epath.Path, names: Iterable[str]) -> dict[str, list[tuple]]:
  """{name: [(step, value)]} of the finite values of `names` in a metrics.jsonl file."""
  out: dict[str, list[tuple]] = {name: [] for name in names}
  if not metrics_path.exists():
    return out
  for line in metrics_path.read_text().splitlines():
    row = json.loads(line) if line.strip() else {}
    for name in out:
      value = row.get(name)
      if isinstance(value, (int, float)) and math.isfinite(value):
        out[name].append((int(row["step"]), float(value)))
  return out


ROW_NAMES = {"input": "input", "model_input": "model input", "reconstruction": "reconstruction"}


class Evaluator:
  """The reconstruction loss of a MIM objective on one split, and pictures of it.

  Args:
    predict_fn, task, class_names: the base arguments; unused (nothing is classified).
    batches, put_batch, split: as `classification.Evaluator`.
    data: the entry's `EvalData`: its `objective` (a MIM objective, with `views`), `apply_fn`
      and `key`.
    num_images: images in the picture (> 0).
    seed: the key of the corruption draws (>= 0).

  Raises:
    ValueError: a run whose objective is not a MIM objective, bad options.
  """

  OPTIONS = {
      "data": ("the dataset config whose split is evaluated, e.g. dict(name='medmnist', "
               "flag='pneumoniamnist', size=28) (default: config.input.data)"),
      "num_images": "images in the reconstruction picture (default 8)",
      "seed": "key of the corruption draws, the same at every evaluation (default 0)",
  }
  WRITES_FILES = True

  def __init__(self, predict_fn: Callable[..., jax.Array],
               batches: Callable[[], Iterable[Mapping[str, np.ndarray]]],
               put_batch: Callable[[Mapping[str, np.ndarray]], Mapping[str, jax.Array]],
               task: str, class_names: list[str] | None = None, split: str = "?", *,
               data: EvalData, num_images: int = 8, seed: int = 0):
    del predict_fn, task, class_names
    objective = data.objective
    if not hasattr(objective, "views") or data.apply_fn is None:
      raise ValueError(f"config.evals.{data.key}: the 'reconstruction' evaluator needs a masked "
                       "image modelling objective (config.loss.name in 'simmim', 'mae', "
                       "'frequency', 'deblur', config.model_name='vit_mim'); this run trains "
                       f"{type(objective).__name__}.")
    for name, value, low in (("num_images", num_images, 1), ("seed", seed, 0)):
      if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"config.evals.{data.key}.{name}={value!r} must be an int >= {low}.")
    self.key, self.split, self.num_images, self.seed = data.key, split, num_images, seed
    self.source = str(data.data_cfg.get("flag") or data.data_cfg.get("name") or "held-out")
    self._objective = objective
    self._batches, self._put = batches, put_batch
    self._loss = jax.jit(functools.partial(batch_loss, objective, data.apply_fn))
    self._apply = jax.jit(data.apply_fn, static_argnames=("train",))
    self._images: np.ndarray | None = None

  def _loss_and_images(self, train_state: Mapping[str, Any]) -> tuple[float, int]:
    """The mean loss over the split's real images and their count; keeps the first images."""
    key = jax.random.key(self.seed)
    total, count, images = 0.0, 0, []
    for index, batch in enumerate(self._batches()):
      device_batch = self._put(batch)
      loss, rows = self._loss(train_state, device_batch, jax.random.fold_in(key, index))
      rows = float(rows)
      total += float(loss) * rows
      count += int(rows)
      if self._images is None and sum(len(x) for x in images) < self.num_images:
        keep = _to_host(device_batch["mask"]).astype(bool)
        images.append(_to_host(device_batch["image"])[keep])
    if count == 0:
      raise ValueError(f"config.evals.{self.key}: split {self.split!r} gave no images.")
    if self._images is None:
      self._images = np.concatenate(images)[:self.num_images]
    return total / count, count

  def views(self, train_state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """The objective's views of the picture's images ([0, 1], `display_range`)."""
    if self._images is None:
      self._loss_and_images(train_state)
    views = self._objective.views(self._apply, state_lib.full_params(train_state),
                                  train_state["model_state"], jnp.asarray(self._images),
                                  jax.random.key(self.seed))
    return display_range(views)

  def _write(self, train_state: Mapping[str, Any], workdir: epath.Path, step: int | None,
             final: bool) -> None:
    views = self.views(train_state)  # Every process: the model may be sharded.
    if jax.process_index() != 0:
      return
    name = "final" if final else f"step_{step}"
    title = (f"{self._objective.name} on {self.source} {self.split} images, "
             + (f"final evaluation (step {step})" if final else f"step {step}"))
    png = plots.image_grid({ROW_NAMES[k]: v for k, v in views.items()}, title)
    path = workdir / "reconstructions" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png)
    if final:
      series = read_curves(workdir / "metrics.jsonl", ("train/loss", f"{self.key}/loss"))
      labels = {"train/loss": "training loss (batches)",
                f"{self.key}/loss": f"{self.split} loss (held out)"}
      (workdir / "loss_curve.png").write_bytes(plots.curves(
          {labels[k]: v for k, v in series.items()}, "step", f"{self._objective.name} loss",
          f"{self._objective.name} pretraining loss"))

  def run(self, train_state: Mapping[str, Any],
          predictions_path: str | os.PathLike | None = None, *,
          workdir: epath.PathLike | None = None, step: int | None = None, final: bool = False
          ) -> Iterator[tuple[str, float | None]]:
    """Yields ('num_examples', n) and ('loss', mean loss); writes the pictures (module
    docstring) when `workdir` is given.

    Args:
      train_state: the state to evaluate.
      predictions_path: accepted for the evaluator interface; nothing is written there.
      workdir: the run's directory, or None to write nothing.
      step: the step of the evaluated state, for the file name and title.
      final: the final evaluation: writes `final.png` and the loss curve.
    """
    del predictions_path
    loss, count = self._loss_and_images(train_state)
    if workdir is not None:
      self._write(train_state, epath.Path(workdir), step, final)
    yield "num_examples", float(count)
    yield "loss", loss
