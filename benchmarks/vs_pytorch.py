"""Training throughput of fm_adapt against a plain PyTorch eager ViT on the same CPU.

  python -m benchmarks.vs_pytorch --out workdirs/bench/vs_pytorch                # full run
  python -m benchmarks.vs_pytorch --quick --out workdirs/bench/vs_pytorch_quick  # ~30 s smoke run
  python -m benchmarks.vs_pytorch --models Ti/4@28 --strategies full --rounds 5 --steps 3

For each model and strategy (full fine-tuning; LoRA r=8 on query and value, head trainable):
  fm_adapt  the library's own jitted update step, built exactly as in `adapt_cost` (plain Adam,
            lr 1e-3, float32), on a fixed random batch;
  PyTorch   an eager reference with the same architecture and shapes, written below: VALID
            patch conv, class token, position embedding of the patches, pre-LN blocks with
            separate query/key/value/out Linear layers, `F.scaled_dot_product_attention`, exact
            GELU, LayerNorm eps 1e-6, final LayerNorm, class-token head; `torch.optim.Adam`
            (betas 0.9/0.999, eps 1e-8, lr 1e-3) over the trainable parameters only.
The two are timed in alternating rounds (A B, B A, A B, ...) of --steps steps each, so that
changes in the load of the shared machine hit both; images/s is reported per framework as the
median over rounds, together with the median of the per-round ratios fm_adapt / PyTorch.
torch runs with `torch.set_num_threads(os.cpu_count())` and flush-to-zero denormals (XLA's CPU
default); torch is imported here only, it is not a dependency of the package.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np

from benchmarks import adapt_cost, common
from fm_adapt.models import vit

NUM_CLASSES = adapt_cost.NUM_CLASSES
STRATEGIES = ('full', 'lora_qv')
LORA_RANK, LORA_ALPHA = 8, 16
DEFAULT_BATCH = common.DEFAULT_BATCH
QUICK = dict(models=['mu/4@28'], batch=8, rounds=2, steps=2, warmup=1)
TARGET = 1.2


NOTES = """\
- img/s and the ratio are wall-clock: the median over rounds of n * batch / (time of n steps),
  and the median of the per-round ratios fm_adapt / PyTorch (the two run back to back, in
  alternating order, so a change of the machine's load hits both).
- CPU s/step is the process CPU time (all threads) per step, median over rounds; the CPU-time
  ratio is PyTorch's / fm_adapt's. On a CPU shared with other jobs, multi-threaded wall times
  depend on how each runtime copes with oversubscription (torch's OpenMP threads wait at a
  barrier for a descheduled peer; XLA's thread pool hands the work to whichever thread runs), so
  compare with `--cores 1` (one pinned core, one thread each), whose ratio is the compute
  efficiency per core."""


def torch_modules() -> tuple[type[Any], Callable[..., None]]:
  """The PyTorch reference modules (a function, so torch is imported only when run)."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class LoRALinear(nn.Module):
    """A frozen Linear plus s * (x @ A) @ B; A [in, r] kaiming-uniform, B [r, out] zero."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float):
      super().__init__()
      self.base, self.scale = base, alpha / rank
      bound = 1.0 / math.sqrt(base.in_features)
      self.lora_a = nn.Parameter(torch.empty(base.in_features, rank).uniform_(-bound, bound))
      self.lora_b = nn.Parameter(torch.zeros(rank, base.out_features))

    def forward(self, x):
      """base(x) + s * (x @ A) @ B."""
      return self.base(x) + ((x @ self.lora_a) * self.scale) @ self.lora_b

  class Attention(nn.Module):
    """Separate q/k/v/out [D, D] projections around F.scaled_dot_product_attention."""

    def __init__(self, width: int, heads: int):
      super().__init__()
      self.heads = heads
      self.query, self.key, self.value, self.out = (nn.Linear(width, width) for _ in range(4))

    def forward(self, x):
      """Self-attention of tokens x [B, T, D]."""
      b, t, d = x.shape
      split = lambda y: y.view(b, t, self.heads, d // self.heads).transpose(1, 2)
      q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
      y = F.scaled_dot_product_attention(q, k, v)  # [B, H, T, D/H], scale 1/sqrt(D/H).
      return self.out(y.transpose(1, 2).reshape(b, t, d))

  class Block(nn.Module):
    """Pre-LN block: x + attn(ln(x)); x + fc2(gelu(fc1(ln(x))))."""

    def __init__(self, width: int, mlp_dim: int, heads: int):
      super().__init__()
      self.ln_attn, self.ln_mlp = nn.LayerNorm(width, eps=1e-6), nn.LayerNorm(width, eps=1e-6)
      self.attn = Attention(width, heads)
      self.fc1, self.fc2 = nn.Linear(width, mlp_dim), nn.Linear(mlp_dim, width)

    def forward(self, x):
      """Applies the block to tokens x [B, T, D]."""
      x = x + self.attn(self.ln_attn(x))
      return x + self.fc2(F.gelu(self.fc1(self.ln_mlp(x))))  # Exact (erf) GELU.

  class ViT(nn.Module):
    """Class-token ViT with the shapes of `fm_adapt.models.vit.Model`."""

    def __init__(self, width: int, depth: int, mlp_dim: int, num_heads: int, patch_size: int,
                 image_size: int, num_classes: int):
      super().__init__()
      n = (image_size // patch_size) ** 2
      self.embedding = nn.Conv2d(3, width, patch_size, stride=patch_size)
      self.cls = nn.Parameter(torch.zeros(1, 1, width))
      self.pos_embedding = nn.Parameter(torch.randn(1, n, width) * 0.02)
      self.blocks = nn.ModuleList(Block(width, mlp_dim, num_heads) for _ in range(depth))
      self.norm = nn.LayerNorm(width, eps=1e-6)
      self.head = nn.Linear(width, num_classes)

    def forward(self, image):
      """Logits [B, K] of images [B, C, H, W]."""
      x = self.embedding(image).flatten(2).transpose(1, 2) + self.pos_embedding
      x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1)
      for block in self.blocks:
        x = block(x)
      return self.head(self.norm(x)[:, 0])

  def add_lora(model: ViT, rank: int, alpha: float) -> None:
    """Freezes everything but the head and wraps every query / value Linear with LoRA."""
    for p in model.parameters():
      p.requires_grad_(False)
    for block in model.blocks:
      block.attn.query = LoRALinear(block.attn.query, rank, alpha)
      block.attn.value = LoRALinear(block.attn.value, rank, alpha)
    for p in model.head.parameters():
      p.requires_grad_(True)

  return ViT, add_lora


def make_torch_step(model_spec: str, strategy: str, images: Any, labels: Any
                    ) -> tuple[Callable[[], None], int]:
  """Builds the PyTorch model, optimizer and one training step on a fixed batch.

  Returns:
    (step function, number of trainable parameters).
  """
  import torch  # pylint: disable=g-import-not-at-top
  variant, size = adapt_cost.parse_model(model_spec)
  dims = vit.decode_variant(variant)
  vit_cls, add_lora = torch_modules()
  torch.manual_seed(0)
  model = vit_cls(**dims, image_size=size, num_classes=NUM_CLASSES)
  if strategy == 'lora_qv':
    add_lora(model, LORA_RANK, LORA_ALPHA)
  model.train()
  params = [p for p in model.parameters() if p.requires_grad]
  opt = torch.optim.Adam(params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, **adam_kwargs())
  x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())  # NHWC -> NCHW.
  y = torch.from_numpy(labels.astype('int64'))

  def step() -> None:
    """One Adam step on the fixed batch."""
    opt.zero_grad(set_to_none=True)
    loss = torch.nn.functional.cross_entropy(model(x), y)
    loss.backward()
    opt.step()

  return step, sum(p.numel() for p in params)


def adam_kwargs() -> dict[str, Any]:
  """The fastest torch Adam implementation on CPU: fused (torch >= 2.4), else foreach."""
  import torch  # pylint: disable=g-import-not-at-top
  try:
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], fused=True)
    return dict(fused=True)
  except (RuntimeError, TypeError):
    return dict(foreach=True)


def make_jax_step(model_spec: str, strategy: str, batch: int
                  ) -> tuple[Callable[[], None], dict[str, Any], int]:
  """The library's compiled update step on a fixed random batch.

  Returns:
    (step function, the batch as numpy arrays, number of trainable parameters).
  """
  variant, size = adapt_cost.parse_model(model_spec)
  config = adapt_cost.make_config(variant, adapt_cost.STRATEGIES[strategy])
  jitted, state, mesh = adapt_cost.build_step(config, (size, size, 3), host_init=True)
  data, rng = adapt_cost.random_batch(mesh, batch, size), jax.random.key(1)
  compiled = jitted.lower(state, rng, data).compile()
  holder = {'state': state}
  trainable = adapt_cost.tree_count(state['params'])

  def step() -> None:
    """One update step on the fixed batch, waited for."""
    holder['state'], metrics = compiled(holder['state'], rng, data)
    jax.block_until_ready((holder['state'], metrics))

  return step, {k: np.asarray(v) for k, v in data.items()}, trainable


def alternate(steps: dict[str, Callable[[], None]], rounds: int, n: int, warmup: int
              ) -> dict[str, dict[str, list[float]]]:
  """Times n steps of each function per round, alternating the order every round.

  Returns:
    {name: {'wall': [seconds of n steps, per round], 'cpu': [process CPU seconds, per round]}}.
  """
  names = list(steps)
  for name in names:
    for _ in range(warmup):
      steps[name]()
  seconds = {name: dict(wall=[], cpu=[]) for name in names}
  for r in range(rounds):
    for name in (names if r % 2 == 0 else names[::-1]):
      wall, cpu = common.time_calls(steps[name], n)
      seconds[name]['wall'].append(sum(wall))
      seconds[name]['cpu'].append(sum(cpu))
  return seconds


def compare(model: str, strategy: str, batch: int, rounds: int, n: int, warmup: int
            ) -> dict[str, Any]:
  """Builds both steps, times them in alternating rounds; returns the comparison record."""
  jax_step, data, jax_trainable = make_jax_step(model, strategy, batch)
  torch_step, torch_trainable = make_torch_step(model, strategy, data['image'], data['label'])
  load_start = common.load_average()
  seconds = alternate({'fm_adapt': jax_step, 'pytorch': torch_step}, rounds, n, warmup)
  ips = {k: [n * batch / s for s in v['wall']] for k, v in seconds.items()}
  cpu_per_step = {k: statistics.median(v['cpu']) / n for k, v in seconds.items()}
  return dict(model=model, strategy=strategy, batch=batch, rounds=rounds, steps_per_round=n,
              trainable=dict(fm_adapt=jax_trainable, pytorch=torch_trainable),
              seconds=seconds, images_per_s={k: statistics.median(v) for k, v in ips.items()},
              ratio=statistics.median(a / b for a, b in zip(ips['fm_adapt'], ips['pytorch'])),
              ratios=[a / b for a, b in zip(ips['fm_adapt'], ips['pytorch'])],
              cpu_s_per_step=cpu_per_step,
              cpu_ratio=cpu_per_step['pytorch'] / cpu_per_step['fm_adapt'],
              loadavg=dict(start=load_start, end=common.load_average()))


def table(records: Sequence[dict[str, Any]]) -> str:
  """Markdown table of the comparison records."""
  headers = ['model', 'strategy', 'batch', 'trainable (fm_adapt / torch)', 'fm_adapt img/s',
             'PyTorch img/s', 'ratio fm_adapt/PyTorch (median of rounds)', 'round ratios',
             f'>= {TARGET}x', 'CPU s/step fm_adapt / PyTorch', 'CPU-time ratio']
  rows = []
  for r in records:
    rows.append([
        f"ViT-{r['model']}", adapt_cost.STRATEGIES[r['strategy']].label, r['batch'],
        f"{r['trainable']['fm_adapt']:,} / {r['trainable']['pytorch']:,}",
        f"{r['images_per_s']['fm_adapt']:.1f}", f"{r['images_per_s']['pytorch']:.1f}",
        f"{r['ratio']:.2f}x", ' '.join(f'{x:.2f}' for x in r['ratios']),
        'MET' if r['ratio'] >= TARGET else 'MISSED',
        f"{r['cpu_s_per_step']['fm_adapt']:.3f} / {r['cpu_s_per_step']['pytorch']:.3f}",
        f"{r['cpu_ratio']:.2f}x"])
  return common.markdown_table(headers, rows)


def restrict_cores(cores: int | None) -> list[int] | None:
  """Pins this process to its first `cores` allowed CPUs; returns them (None: not pinned).

  Must run before the XLA CPU backend is initialized (its thread pool is sized from the affinity
  mask then); importing jax does not initialize it.
  """
  if not cores or not hasattr(os, 'sched_setaffinity'):
    return None
  allowed = sorted(os.sched_getaffinity(0))
  if cores > len(allowed):
    raise ValueError(f'--cores {cores} but only {len(allowed)} CPUs are available: {allowed}.')
  os.sched_setaffinity(0, allowed[:cores])
  return allowed[:cores]


def available_cores() -> int:
  """The number of CPUs this process may run on."""
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def setup_torch() -> dict[str, Any]:
  """Sets torch's threads to the available cores and flush-to-zero; returns the settings."""
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(available_cores())
  torch.set_flush_denormal(True)
  return dict(torch=torch.__version__, threads=torch.get_num_threads(),
              interop_threads=torch.get_num_interop_threads(), adam=adam_kwargs(),
              flush_denormal=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
  """Command-line flags."""
  p = common.model_parser(__doc__, STRATEGIES)
  p.add_argument('--rounds', type=int, default=5, help='alternating rounds')
  p.add_argument('--steps', type=int, default=3, help='steps per framework per round')
  p.add_argument('--warmup', type=int, default=2, help='untimed steps of each before round 1')
  p.add_argument('--cores', type=int, default=None,
                 help='pin the process to this many CPUs (default: all available); torch uses '
                      'as many threads, XLA sizes its thread pool from the affinity mask')
  p.add_argument('--out', default=None, help='run directory for vs_pytorch.{md,json}')
  p.add_argument('--quick', action='store_true', help=f'seconds-long smoke run: {QUICK}')
  args = p.parse_args(argv)
  args.models, args.strategies = args.models.split(','), args.strategies.split(',')
  if args.quick:
    args.models, args.rounds = QUICK['models'], QUICK['rounds']
    args.steps, args.warmup = QUICK['steps'], QUICK['warmup']
    args.batch = args.batch or QUICK['batch']
  common.check_model_args(p, args, STRATEGIES, adapt_cost.parse_model)
  return args


def report(args: argparse.Namespace, records: Sequence[dict[str, Any]],
           torch_info: dict[str, Any], load_before: tuple[float, float, float]) -> str:
  """The markdown report; also written (with a JSON record) to --out when given."""
  info = dict(common.machine_info(), loadavg_before=load_before, **torch_info)
  header = (f"Machine: {info['cpu']}, {info['cores']} cores; jax {info['jax']}, torch "
            f"{info['torch']} ({info['threads']} threads, Adam {info['adam']}, flush-to-zero); "
            f"CPUs {info['pinned_cpus'] or 'all'}; "
            f"float32; XLA_FLAGS={info['xla_flags'] or '(none)'}; load average before "
            f"{load_before[0]:.2f}, after {info['loadavg'][0]:.2f} (`uptime`: {info['uptime']}); "
            f"{args.rounds} alternating rounds of {args.steps} steps after {args.warmup} warm-up.")
  markdown = '\n\n'.join(['## fm_adapt vs PyTorch eager, training images/s', header,
                           table(records), NOTES])
  if args.out:
    common.write_result(args.out, 'vs_pytorch', markdown,
                        dict(machine=info, args=vars(args), records=list(records)))
  return markdown


def main(argv: Sequence[str] | None = None) -> None:
  """Runs every comparison, prints the table, writes the result files (after each one)."""
  args = parse_args(argv)
  pinned = restrict_cores(args.cores)  # Before XLA's or torch's thread pool starts.
  torch_info = dict(setup_torch(), pinned_cpus=pinned)
  load_before, records = common.load_average(), []
  for model in args.models:
    for strategy in args.strategies:
      print(f'[vs_pytorch] {model} {strategy} batch {args.batch_for[model]} ...', flush=True)
      records.append(compare(model, strategy, args.batch_for[model], args.rounds, args.steps,
                             args.warmup))
      r = records[-1]
      print(f"  fm_adapt {r['images_per_s']['fm_adapt']:.1f} img/s, PyTorch "
            f"{r['images_per_s']['pytorch']:.1f} img/s, ratio {r['ratio']:.2f}x", flush=True)
      markdown = report(args, records, torch_info, load_before)
  print(markdown)
  if args.out:
    print(f'[vs_pytorch] wrote {args.out}/vs_pytorch.md and .json')


if __name__ == '__main__':
  main()
