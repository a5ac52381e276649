"""K seeds as one program (`fm_adapt.train.stacked`) against K sequential runs, on the CPU.

  python -m benchmarks.stacked_seeds                    # ViT-Ti/4 and ResNet-18 @ 28 px, K = 3
  python -m benchmarks.stacked_seeds --models vit_ti4_28 --steps 4 --rounds 3 --out DIR
  python -m benchmarks.stacked_seeds --quick            # seconds: ViT-mu/4, ResNet-18 width 8

Per model, the library's own update step is built as a run builds it (`build.build_train_fns`,
`state.sharded_init` with each seed's key, `state.initial_state`), with the run config of the
study: ResNet-18 @ 28 px is experiments/medmnist_v2.py's `model=resnet18_28` (CIFAR stem,
PyTorch init, Adam 1e-3, batch 128); ViT-Ti/4 @ 28 px takes the same optimizer at the ViT
benchmarks' batch of 32 (`common.DEFAULT_BATCH`). Images are 28x28x1 (MedMNIST's grey 28 px).

Sequential: one jitted update (`step.jit_update`, compiled once and shared, as a study's runs
would compile theirs), N steps of seed 0, then N of seed 1, ... Stacked: the K states stacked
(`stacked.stack_states`) and N steps of `jax.jit(jax.vmap(update_fn))`
(`stacked.jit_stacked_update`) with the seeds' vmap-exact keys. Each seed has its own fixed
random batch, on the devices before timing (data loading is not measured). After compiling and
one warm-up step each, the two alternate for --rounds rounds (the order reversed every other
round), each round timing N steps of every seed; seed-steps/s is K * N over a round's time, the
speed-up the median over rounds of (sequential time / stacked time) of the same round, so load
changes hit both sides. CPU s is the process CPU time (all threads) per seed-step.

The goal of issue 15 is a speed-up >= 1.3x for the ViT. A speed figure is evidence only from a
quiet machine (benchmarks/README.md, "Quiet machine"): the load average is printed with the
table and written to the JSON record.
"""
from __future__ import annotations

import argparse
import statistics
import time
import types
from collections.abc import Callable, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np

from benchmarks import common
from experiments import medmnist_v2
from fm_adapt import config as config_lib
from fm_adapt.train import build
from fm_adapt.train import mesh as mesh_lib
from fm_adapt.train import stacked
from fm_adapt.train import state as state_lib
from fm_adapt.train import step as step_lib

NUM_CLASSES = 2
IMAGE_SHAPE = (28, 28, 1)


def _vit_config(variant: str) -> ml_collections.ConfigDict:
  config = medmnist_v2.get_config("model=resnet18_28")  # Its optimizer and schedule.
  config.model_name = "vit"
  config.model = ml_collections.ConfigDict(dict(variant=variant))
  return config


def _resnet_config(width: int | None = None) -> ml_collections.ConfigDict:
  config = medmnist_v2.get_config("model=resnet18_28")
  if width is not None:
    config.model.width = width
  return config


# name -> (description, config factory, default batch)
MODELS: dict[str, tuple[str, Callable[[], ml_collections.ConfigDict], int]] = {
    "vit_ti4_28": ("ViT-Ti/4 @ 28 px", lambda: _vit_config("Ti/4"),
                   common.DEFAULT_BATCH["Ti/4@28"]),
    "resnet18_28": ("ResNet-18 @ 28 px (MedMNIST v2)", _resnet_config, 128),
    "vit_mu4_28": ("ViT-mu/4 @ 28 px (smoke)", lambda: _vit_config("mu/4"), 8),
    "resnet18w8_28": ("ResNet-18 width 8 @ 28 px (smoke)", lambda: _resnet_config(8), 8),
}
QUICK = dict(models=["vit_mu4_28", "resnet18w8_28"], steps=2, rounds=2)


def build_states(config: ml_collections.ConfigDict, seeds: Sequence[int], mesh: Any
                 ) -> tuple[Callable[..., Any], list[dict[str, Any]], list[jax.Array]]:
  """The (unjitted) update step, each seed's initial state and its training key."""
  spec = types.SimpleNamespace(num_classes=NUM_CLASSES, task="multiclass")
  states, keys, update_fn = [], [], None
  for seed in seeds:
    init_rng, train_rng = jax.random.split(jax.random.key(seed, impl="rbg"))
    fns = build.build_train_fns(config, spec, IMAGE_SHAPE, 1000, init_rng)
    update_fn = update_fn or fns.update_fn  # One function: the seeds' configs are the same.
    variables = state_lib.sharded_init(fns.model_fns.init_fn, init_rng, mesh)
    states.append(state_lib.initial_state(fns, variables, mesh))
    keys.append(train_rng)
  return update_fn, states, keys


def host_batches(seeds: Sequence[int], batch: int) -> list[dict[str, np.ndarray]]:
  """One fixed random batch per seed (images, labels, an all-True mask)."""
  out = []
  for seed in seeds:
    rng = np.random.default_rng(seed)
    out.append(dict(image=rng.standard_normal((batch, *IMAGE_SHAPE)).astype(np.float32),
                    label=rng.integers(0, NUM_CLASSES, (batch,)).astype(np.int32),
                    mask=np.ones((batch,), bool)))
  return out


def _temp_bytes(compiled: Any) -> int | None:
  stats = compiled.memory_analysis()
  return None if stats is None else int(stats.temp_size_in_bytes)


def _compile(jitted: Callable[..., Any], *args: Any) -> tuple[Any, float, int | None]:
  """(compiled, compile seconds, XLA temp bytes)."""
  start = time.perf_counter()
  compiled = jitted.lower(*args).compile()
  return compiled, time.perf_counter() - start, _temp_bytes(compiled)


def prepare(model: str, seeds: Sequence[int], batch: int
            ) -> tuple[dict[str, Any], Callable[[int], None], Callable[[int], None]]:
  """Compiles both programs; returns the record and the two timed functions of N steps."""
  description, make_config, _ = MODELS[model]
  config = make_config()
  config.input.batch_size = batch
  config_lib.validate(config)
  mesh = mesh_lib.make_mesh(config.get("mesh"))
  update_fn, states, keys = build_states(config, seeds, mesh)
  batches = host_batches(seeds, batch)
  single_batches = [mesh_lib.global_batch(b, mesh) for b in batches]
  single, single_s, single_temp = _compile(step_lib.jit_update(update_fn, states[0], mesh),
                                           states[0], keys[0], single_batches[0])
  together, axes = stacked.stack_states(states)
  rngs = jax.device_put(stacked.vmap_exact_keys(keys), mesh_lib.replicated(mesh))
  stacked_batch = stacked.stacked_batch(
      {k: np.stack([b[k] for b in batches]) for k in batches[0]}, mesh)
  update = stacked.jit_stacked_update(update_fn, together, axes, mesh)
  together_c, stacked_s, stacked_temp = _compile(update, together, rngs, stacked_batch)
  current = dict(states=states, together=together)

  def sequential(n: int) -> None:
    for k in range(len(seeds)):
      for _ in range(n):
        current["states"][k], metrics = single(current["states"][k], keys[k], single_batches[k])
      jax.block_until_ready((current["states"][k], metrics))

  def as_one(n: int) -> None:
    for _ in range(n):
      current["together"], metrics = together_c(current["together"], rngs, stacked_batch)
    jax.block_until_ready((current["together"], metrics))

  sequential(1)  # Warm-up.
  as_one(1)
  record = dict(model=model, description=description, batch=batch, seeds=list(seeds),
                compile_single_s=single_s, compile_stacked_s=stacked_s,
                xla_temp_single=single_temp, xla_temp_stacked=stacked_temp,
                params=sum(int(x.size) for x in jax.tree.leaves(states[0]["params"])))
  return record, sequential, as_one


def time_rounds(record: dict[str, Any], sequential: Callable[[int], None],
                as_one: Callable[[int], None], steps: int, rounds: int) -> None:
  """Alternates the two for `rounds` rounds of `steps` steps per seed; adds the timings."""
  k = len(record["seeds"])
  times: dict[str, list[float]] = dict(sequential=[], stacked=[])
  cpu: dict[str, list[float]] = dict(sequential=[], stacked=[])
  fns = dict(sequential=sequential, stacked=as_one)
  for r in range(rounds):
    for name in (["sequential", "stacked"] if r % 2 == 0 else ["stacked", "sequential"]):
      wall, cpu_s = common.time_calls(lambda f=fns[name]: f(steps), 1)
      times[name].append(wall[0])
      cpu[name].append(cpu_s[0])
    print(f"  round {r + 1}/{rounds}: sequential {times['sequential'][-1]:.2f} s, stacked "
          f"{times['stacked'][-1]:.2f} s ({k} seeds x {steps} steps)", flush=True)
  seed_steps = k * steps
  record.update(
      steps=steps, rounds=rounds, round_times=times, round_cpu=cpu,
      seq_seed_steps_per_s=seed_steps / statistics.median(times["sequential"]),
      stacked_seed_steps_per_s=seed_steps / statistics.median(times["stacked"]),
      speedup=statistics.median(s / t for s, t in zip(times["sequential"], times["stacked"])),
      seq_cpu_per_seed_step=statistics.median(cpu["sequential"]) / seed_steps,
      stacked_cpu_per_seed_step=statistics.median(cpu["stacked"]) / seed_steps)


def table(records: Sequence[dict[str, Any]]) -> str:
  headers = ["model", "batch", "K", "compile 1 / stacked (s)", "sequential seed-steps/s",
             "stacked seed-steps/s", "speed-up (median of rounds)", "CPU s / seed-step seq",
             "CPU s / seed-step stacked", "XLA temp 1 / stacked"]
  rows = [[r["description"], r["batch"], len(r["seeds"]),
           f"{r['compile_single_s']:.1f} / {r['compile_stacked_s']:.1f}",
           f"{r['seq_seed_steps_per_s']:.3f}", f"{r['stacked_seed_steps_per_s']:.3f}",
           f"**{r['speedup']:.2f}x**", f"{r['seq_cpu_per_seed_step']:.3f}",
           f"{r['stacked_cpu_per_seed_step']:.3f}",
           f"{common.human_bytes(r['xla_temp_single'])} / "
           f"{common.human_bytes(r['xla_temp_stacked'])}"] for r in records]
  return common.markdown_table(headers, rows)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="vit_ti4_28,resnet18_28",
                 help=f"comma-separated subset of {sorted(MODELS)} (default: %(default)s)")
  p.add_argument("--seeds", type=int, default=3, help="K, the seeds stacked (default 3)")
  p.add_argument("--steps", type=int, default=4, help="timed steps per seed per round")
  p.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
  p.add_argument("--batch", type=int, default=None, help="batch of every model (default: "
                 + ", ".join(f"{m} {b}" for m, (_, _, b) in MODELS.items()) + ")")
  p.add_argument("--out", default=None, help="run directory for stacked_seeds.{md,json}")
  p.add_argument("--quick", action="store_true", help=f"seconds-long smoke run: {QUICK}")
  args = p.parse_args(argv)
  args.models = args.models.split(",")
  if args.quick:
    args.models, args.steps, args.rounds = QUICK["models"], QUICK["steps"], QUICK["rounds"]
  unknown = sorted(set(args.models) - set(MODELS))
  if unknown:
    p.error(f"unknown models {unknown}; valid: {sorted(MODELS)}")
  if args.seeds < 1 or args.steps < 1 or args.rounds < 1:
    p.error("--seeds, --steps and --rounds must be positive")
  return args


def report(args: argparse.Namespace, records: Sequence[dict[str, Any]],
           load_before: tuple[float, float, float]) -> str:
  info = dict(common.machine_info(), loadavg_before=load_before)
  header = (f"Machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']}; float32; "
            f"XLA_FLAGS={info['xla_flags'] or '(none)'}. Load average before "
            f"{load_before[0]:.2f}, after {info['loadavg'][0]:.2f} (`uptime`: {info['uptime']})."
            f" {args.rounds} rounds of {args.steps} steps per seed after one warm-up step each.")
  verdicts = [f"- {r['description']}: {r['speedup']:.2f}x"
              + (" (goal >= 1.3x: " + ("met" if r["speedup"] >= 1.3 else "missed") + ")"
                 if r["model"] == "vit_ti4_28" else "") for r in records]
  if load_before[0] >= 2 or info["loadavg"][0] >= 2:
    verdicts.append("- Measured under load (load average >= 2 on this machine): the speed "
                    "figures are not evidence for a verdict (benchmarks/README.md).")
  markdown = "\n\n".join(["## Seeds as one program", header, table(records),
                          "\n".join(verdicts)])
  if args.out:
    common.write_result(args.out, "stacked_seeds", markdown,
                        dict(machine=info, args=vars(args), records=list(records)))
  return markdown


def main(argv: Sequence[str] | None = None) -> None:
  """Measures every model, prints the table; the files are rewritten after each model."""
  args = parse_args(argv)
  load_before, records = common.load_average(), []
  seeds = list(range(args.seeds))
  for model in args.models:
    batch = args.batch or MODELS[model][2]
    print(f"[stacked_seeds] {model} batch {batch}, {args.seeds} seeds: compiling ...",
          flush=True)
    record, sequential, as_one = prepare(model, seeds, batch)
    time_rounds(record, sequential, as_one, args.steps, args.rounds)
    records.append(record)
    markdown = report(args, records, load_before)
  print(markdown)


if __name__ == "__main__":
  main()
