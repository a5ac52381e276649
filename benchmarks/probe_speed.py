"""Per-epoch time of a linear probe: the head on cached features vs the end-to-end frozen run.

  python -m benchmarks.probe_speed --out workdirs/bench/probe_speed            # ViT-S/4 @ 28 px
  python -m benchmarks.probe_speed --quick --out workdirs/bench/probe_quick    # < 1 min smoke run
  (flags: --variant, --batch, --e2e-steps, --epochs, --synthetic-sizes; see --help)

Both sides are the library's own training run of one config (a ViT linear probe,
`compose.preset('linear_probe')`, Adam, batch 128, pp 'value_range(-1,1)'), built by
`build.build_run`: the end-to-end side steps `run.update_fn` over `run.train_loader` (the frozen
encoder's forward pass every step); the cached side is `linear_probe.cached_run` of the same run
(features computed once, the head's update over a loader of cached features). Each timed step
includes fetching its batch from the loader and placing it on the devices.

  end-to-end epoch   median step time of --e2e-steps steps (after one warm-up step) x steps/epoch
  cached epoch       median wall time of --epochs whole epochs (after one warm-up step)
  extraction         wall time of `cached_run` (features of train, val and test, the check of
                     the first batch): paid once per run
  break-even         epochs after which the cached run, extraction included, is ahead

Data: real PneumoniaMNIST (28 px, 4708 train / 524 val / 624 test) when `$FM_ADAPT_DATA_DIR`
holds medmnist/pneumoniamnist.npz, else a synthetic archive of the same sizes (random images;
the times do not depend on the pixels); `--synthetic-sizes train,val,test` asks for synthetic
data of other sizes. Writes probe_speed.md / .json into --out. The machine's
`uptime` is recorded before and after: speed ratios from a loaded machine are not evidence
(benchmarks/README.md, "Quiet machine").
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import tempfile
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import common
from fm_adapt import config as config_lib
from fm_adapt.adapt import compose
from fm_adapt.train import build
from fm_adapt.train import linear_probe
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import step as step_lib

PNEUMONIA_SIZES = {"train": 4708, "val": 524, "test": 624}
QUICK = dict(variant="mu/4", batch=16, e2e_steps=2, epochs=2, synthetic_sizes=(64, 32, 32))


def synthetic_archive(path: pathlib.Path, sizes: dict[str, int], pixels: int) -> pathlib.Path:
  """A MedMNIST-layout .npz of random grey images and binary labels, `sizes` per split."""
  rng = np.random.default_rng(0)
  arrays = {}
  for split, n in sizes.items():
    arrays[f"{split}_images"] = rng.integers(0, 256, (n, pixels, pixels), np.uint8)
    arrays[f"{split}_labels"] = np.arange(n, dtype=np.uint8).reshape(n, 1) % 2
  np.savez(path, **arrays)
  return path


def data_config(args: argparse.Namespace, scratch: pathlib.Path
                ) -> tuple[dict[str, Any], str, str]:
  """(config.input.data, description, data dir): real PneumoniaMNIST if the data dir holds it
  (and no --synthetic-sizes asks for synthetic data), else a synthetic archive in `scratch`."""
  data_dir = os.environ.get("FM_ADAPT_DATA_DIR")
  real = data_dir and (pathlib.Path(data_dir) / "medmnist" / "pneumoniamnist.npz").exists()
  if real and not args.synthetic_sizes:
    return (dict(name="medmnist", flag="pneumoniamnist", size=28),
            "PneumoniaMNIST (real, 28 px)", data_dir)
  sizes = (dict(zip(PNEUMONIA_SIZES, args.synthetic_sizes)) if args.synthetic_sizes
           else dict(PNEUMONIA_SIZES))
  path = synthetic_archive(scratch / "synthetic_pneumonia.npz", sizes, 28)
  return (dict(name="npz", path=str(path), tfds_dir=str(scratch / "tfds")),
          f"synthetic, PneumoniaMNIST sizes {sizes}", str(scratch))


def make_config(args: argparse.Namespace, data: dict[str, Any], data_dir: str) -> Any:
  """The linear-probe run config both sides train."""
  config = config_lib.base_config()
  config.model = dict(variant=args.variant)
  del config["schedule"]  # A dict by default; the preset is a list of rules.
  config.schedule = compose.preset("linear_probe")
  config.input.update(dict(data=data, pp="value_range(-1,1)", batch_size=args.batch))
  config.evals.val = dict(name="classification", split="val")
  config.evals.test = dict(name="classification", split="test", periodic=False)
  config.total_epochs = float(args.epochs + 2)
  config.loss = dict(name="softmax_xent")
  config.data_dir = data_dir
  config.progress = False
  return config


def _timed_steps(run: build.Run, n: int) -> list[float]:
  """Wall seconds of each of n steps (batch fetch + device placement + update), after one
  warm-up step that compiles."""
  state = run.init_state()
  update = step_lib.jit_update(run.update_fn, state, run.mesh)
  iterator = iter(run.train_loader)
  times = []
  for i in range(n + 1):
    start = time.perf_counter()
    state, measurements = update(state, run.rng, mesh_lib.global_batch(next(iterator), run.mesh))
    jax.block_until_ready(measurements)
    if i:
      times.append(time.perf_counter() - start)
  return times


def _epoch_times(run: build.Run, epochs: int) -> list[float]:
  """Wall seconds of each of `epochs` whole epochs, after one warm-up step."""
  times = _timed_steps(run, epochs * run.steps_per_epoch)
  per = run.steps_per_epoch
  return [sum(times[e * per:(e + 1) * per]) for e in range(epochs)]


def measure(args: argparse.Namespace, scratch: pathlib.Path) -> dict[str, Any]:
  """Runs both sides; returns the record of the result."""
  data, data_text, data_dir = data_config(args, scratch)
  config = make_config(args, data, data_dir)
  run = build.build_run(config, data_dir)
  e2e_steps = _timed_steps(run, args.e2e_steps)
  start = time.perf_counter()
  cached = linear_probe.cached_run(config, run, data_dir)
  extraction = time.perf_counter() - start
  cached_epochs = _epoch_times(cached, args.epochs)
  e2e_epoch = statistics.median(e2e_steps) * run.steps_per_epoch
  cached_epoch = statistics.median(cached_epochs)
  return dict(
      model=f"ViT-{args.variant} @ 28 px", data=data_text, batch=args.batch,
      train_examples=run.num_train_examples, steps_per_epoch=run.steps_per_epoch,
      e2e_step_s=common.summarize(e2e_steps), e2e_epoch_s=e2e_epoch,
      cached_epoch_s=common.summarize(cached_epochs), cached_step_s=cached_epoch /
      run.steps_per_epoch, extraction_s=extraction, speedup_per_epoch=e2e_epoch / cached_epoch,
      break_even_epochs=extraction / max(e2e_epoch - cached_epoch, 1e-9))


def markdown(record: dict[str, Any]) -> str:
  """The result table and the machine line."""
  row = [record["model"], record["data"], record["batch"], record["steps_per_epoch"],
         f"{record['e2e_step_s']['median']:.3f}", f"{record['e2e_epoch_s']:.1f}",
         f"{record['cached_epoch_s']['median']:.3f}", f"{record['speedup_per_epoch']:.0f}x",
         f"{record['extraction_s']:.1f}", f"{record['break_even_epochs']:.2f}"]
  table = common.markdown_table(
      ["model", "data", "batch", "steps/epoch", "end-to-end s/step", "end-to-end s/epoch",
       "cached s/epoch", "speed-up per epoch", "extraction s (once)", "break-even epochs"], [row])
  machine = record["machine"]
  return (f"{table}\n\nuptime before: {record['uptime_before']}\nuptime after: "
          f"{machine['uptime']}\ncpu: {machine['cpu']} ({machine['cores']} cores), jax "
          f"{machine['jax']}, devices: {record['devices']}")


def _sizes(text: str) -> tuple[int, int, int]:
  sizes = tuple(int(v) for v in text.split(","))
  if len(sizes) != 3 or min(sizes) <= 0:
    raise argparse.ArgumentTypeError(f"expected three positive sizes train,val,test; got {text!r}")
  return sizes


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--variant", default="S/4", help="ViT variant at 28 px (default %(default)s)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--e2e-steps", type=int, default=5, help="timed end-to-end steps")
  p.add_argument("--epochs", type=int, default=3, help="timed cached epochs")
  p.add_argument("--synthetic-sizes", type=_sizes, default=None,
                 help="train,val,test sizes of synthetic data, used even when the real file is "
                      "there (default: the real file, else synthetic 4708,524,624)")
  p.add_argument("--out", default=None, help="write probe_speed.md / .json here")
  p.add_argument("--quick", action="store_true", help=f"smoke run: {QUICK}")
  args = p.parse_args(argv)
  if args.quick:
    for key, value in QUICK.items():
      setattr(args, key, value)
  return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  uptime_before = common.machine_info()["uptime"]
  with tempfile.TemporaryDirectory() as scratch:
    record = measure(args, pathlib.Path(scratch))
  record.update(uptime_before=uptime_before, machine=common.machine_info(),
                devices=[str(d) for d in jax.devices()])
  text = markdown(record)
  print(text)
  if args.out:
    common.write_result(args.out, "probe_speed", text, record)
  return record


if __name__ == "__main__":
  main()
