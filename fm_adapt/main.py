"""Train and evaluate one config.

  python -m fm_adapt.main --config experiments/quickstart.py:runlocal --workdir workdirs/qs \
      [--config.lr=3e-4] [--data_dir DIR]

An existing checkpoint in --workdir is resumed, with the config the workdir was started with
(<workdir>/config.json): a resume with another config that changes training is refused, and
changes of the harmless keys (fm_adapt.train.workdir.HARMLESS_KEYS: log_every, progress,
keep_ckpts, checkpoint_every, data_dir, description, input.worker_count, input.eval_batch_size)
need --allow_harmless_changes. One process trains a workdir at a time (<workdir>/.lock).
Results go to <workdir>/results.json, per-sample predictions to <workdir>/predictions/, metrics
to <workdir>/metrics.jsonl and TensorBoard files to <workdir>/tb. --workdir may be a gs:// URI
(with gcsfs and google-cloud-storage installed); such a workdir is not locked (a warning says so).
"""
from __future__ import annotations

import time

from absl import app, flags, logging
from ml_collections import config_flags

from fm_adapt import process_flags
from fm_adapt.train import interrupt
from fm_adapt.train import loop
from fm_adapt.train import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment file and argument.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the run (created; resumed).")
_DATA_DIR = flags.DEFINE_string("data_dir", None,
                                "Data directory (default: $FM_ADAPT_DATA_DIR, then the cache).")
_ALLOW_HARMLESS = flags.DEFINE_bool(
    "allow_harmless_changes", False,
    "On resume, accept config changes of " + ", ".join(workdir_lib.HARMLESS_KEYS) + ".")


def format_results(results: dict) -> str:
  """One human-readable results line."""
  metrics = results["metrics"]
  parts = [f"{k}={'null' if v is None else f'{v:.4f}'}" for k, v in sorted(metrics.items())
           if k.split("/")[-1] in ("acc", "auc")]
  return (f"RESULT model={results['model_name']} best_step={results['best_step']} "
          f"trainable={results['trainable_params']:,} " + " ".join(parts))


def main(argv) -> None:
  del argv
  flags.mark_flags_as_required(["config", "workdir"])
  if not flags.FLAGS["verbosity"].present:  # Quiet libraries by default; --verbosity=0 for INFO.
    logging.set_verbosity(logging.WARNING)
  start = time.perf_counter()
  try:
    process_flags.start_from_flags()
    results = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value, _DATA_DIR.value,
                                      _ALLOW_HARMLESS.value)
  except KeyboardInterrupt as error:  # interrupt.Stopped too: its checkpoint is saved.
    interrupt.exit_with_resume_hint(error, _WORKDIR.value)
  except loop.REFUSALS as error:
    interrupt.exit_with_error(error)
  logging.info("Results: %s", results)
  print(format_results(results) + f" time={time.perf_counter() - start:.1f}s", flush=True)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
