"""Launch fm_adapt on several hosts: SLURM clusters and Cloud TPU VM pods.

  python -m launch slurm --nodes 2 --gpus_per_node 8 --time 04:00:00 -- fm_adapt.main ...
  python -m launch tpu --tpu my-pod --zone us-central2-b -- fm_adapt.main ...

Each starts one process per host running the fm_adapt command given after `--` with
`--multihost` (JAX detects the cluster). Both default to a dry run that prints what they would
run. This package imports neither JAX nor fm_adapt, so it runs on a login node or a laptop.
"""
