"""The sharded train step: data parallel and FSDP on 8 fake devices equal one device.

The fine-tuning objective is the one stepped here; the pre-training objective's sharded loss
and gradients are held to one device in tests/losses/test_pretrain.py, and the step itself
does not depend on the objective."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    sys.path[:0] = [{root!r}, {tests!r}, {helpers!r}]
    import jax, numpy as np
    import helpers
    from test_pretrain import batch
    from medvqa_jax.models import amif
    from medvqa_jax.train import optim, sharding, step as step_lib
    assert jax.device_count() == 8

    def finetune_batch(n=8, seed=0):
      rng = np.random.default_rng(seed)
      b = batch(n, seed)
      b = {{k: b[k] for k in ("images", "input_ids", "attention_mask")}}
      a = np.zeros((n, 8), np.int32); a[:, 0] = 101; a[:, 1] = rng.integers(1000, 5000, n)
      a[:, 2] = 102
      b.update(answer_ids=a, answer_mask=(a > 0).astype(np.int32))
      return b

    def run(objective, params, tx, data, mesh, accum=1):
      shardings = step_lib.state_shardings(mesh, params, tx, min_size=64)
      state = step_lib.init_state(params, tx, shardings)
      train_step = step_lib.make_train_step(objective, tx, shardings, accum)
      metrics = None
      for s in range(2):
        state, metrics = train_step(state, sharding.shard_batch(mesh, data), jax.random.PRNGKey(s))
      return jax.device_get(state["params"]), jax.device_get(metrics), shardings

    # Updated params are compared after plain SGD (lr 1), where they differ exactly as the
    # gradients do. The config's AdamW (with FSDP-sharded optimizer state) is run too, and
    # its losses compared, but not its params: Adam turns gradients that are zero up to
    # rounding (attention key biases, to which softmax is invariant) into updates of about
    # the learning rate in either direction, whatever the device layout.
    import optax
    config = helpers.tiny_config()
    config.optim.update(lr=1e-3, total_steps=10)
    model, params = amif.create(config)
    objective = step_lib.finetune_objective(
        model, np.arange(2000, 2064, dtype=np.int32), (np.arange(64) < 40).astype(np.int32))
    data = finetune_batch(16, 4)
    one_device = sharding.make_mesh(1, devices=jax.devices()[:1])
    # fsdp=4 on 8 devices: 2-way data parallel x 4-way parameter sharding.
    fsdp = 4
    for tx, tol in ((optax.sgd(1.0), 1e-5), (optim.make(config.optim, params), None)):
      ref_params, ref_metrics, _ = run(objective, params, tx, data, one_device)
      if tol is not None:
        sgd_ref = ref_params, ref_metrics
      moved = max(float(np.max(np.abs(a - b))) for a, b in
                  zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
      assert moved > 1e-4  # The updates are large enough for the check to bite.
      got_params, got_metrics, sh = run(objective, params, tx, data, sharding.make_mesh(fsdp))
      specs = [s.spec for s in jax.tree.leaves(sh["params"])]
      assert any("fsdp" in str(spec) for spec in specs), "nothing was FSDP-sharded"
      for k in ref_metrics:
        np.testing.assert_allclose(got_metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6,
                                   err_msg=f"fsdp={{fsdp}} {{k}}")
      for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(got_params)):
        assert np.all(np.isfinite(b))
        if tol is not None:
          np.testing.assert_allclose(b, a, rtol=tol, atol=tol, err_msg=f"fsdp={{fsdp}}")
    # Two micro-batches of 8 give the same step as one batch of 16.
    ref_params, ref_metrics = sgd_ref
    acc_params, acc_metrics, _ = run(objective, params, optax.sgd(1.0), data,
                                     sharding.make_mesh(1), 2)
    np.testing.assert_allclose(acc_metrics["loss"], ref_metrics["loss"], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(ref_params), jax.tree.leaves(acc_params)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    print("OK finetune", float(ref_metrics["loss"]))
    """)


def test_sharded_step_equals_single_device():
  code = SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests" / "losses"),
                       helpers=str(ROOT / "tests"))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=1200, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-5000:]
  assert "OK finetune" in out.stdout
