"""Tests of fm_adapt.train.mesh: sharding rules over parameter paths, moments follow parameters.

Runs in a subprocess with 4 simulated CPU devices (the device count is fixed at JAX start-up).
"""
import os
import subprocess
import sys
import textwrap


_SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, optax
    from jax.sharding import PartitionSpec as P
    from fm_adapt.train import mesh as mesh_lib
    mesh = mesh_lib.make_mesh([("data", 1), ("fsdp", 4)])
    shapes = {"params": {"enc": {"kernel": jax.ShapeDtypeStruct((8, 16), jnp.float32)},
                         "head": {"kernel": jax.ShapeDtypeStruct((16, 4), jnp.float32),
                                  "bias": jax.ShapeDtypeStruct((4,), jnp.float32)}},
              "batch_stats": {"enc": {"mean": jax.ShapeDtypeStruct((16,), jnp.float32)}}}
    rules = [("head/.*", "replicate"), (".*", "fsdp")]
    sh = mesh_lib.param_shardings(shapes, mesh, rules)
    assert sh["params"]["head"]["kernel"].spec == P(), sh["params"]["head"]["kernel"]
    assert sh["params"]["enc"]["kernel"].spec == P(None, "fsdp")
    assert sh["batch_stats"]["enc"]["mean"].spec == P("fsdp")
    params = jax.tree.map(lambda s: jnp.zeros(s.shape), shapes["params"])
    tx = optax.adam(1e-3)
    opt = mesh_lib.optimizer_shardings(tx, jax.eval_shape(tx.init, params), sh["params"], mesh)
    # The head kernel (16, 4) would be fsdp-sharded by its shape; its moments follow its rule.
    assert opt[0].mu["head"]["kernel"].spec == P() and opt[0].nu["head"]["kernel"].spec == P()
    assert opt[0].mu["enc"]["kernel"].spec == P(None, "fsdp")
    assert opt[0].count.spec == P()
    for bad, match in [([("params/.*", "fsdp")], "sharding rule"),
                       ([("hed/.*", "replicate"), (".*", "fsdp")], "hed/"),
                       ([("head/.*", "fsdp")], "match no sharding rule"),
                       ([(".*", "shard")], "Unknown sharding strategy")]:
      try:
        mesh_lib.param_shardings(shapes, mesh, bad)
      except ValueError as e:
        assert match in str(e), (match, str(e))
      else:
        raise AssertionError(f"no error for {bad}")
    print("OK")
''')


def test_rules_match_parameter_paths_and_moments_follow_their_parameters():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4 "
             + os.environ["FM_ADAPT_TEST_XLA_FLAGS"],
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), proc.stderr[-3000:]
