"""The sharded train step: data parallel x FSDP on 8 fake devices, with gradient
accumulation, equals one device stepping the whole batch.

The fine-tuning objective is the one stepped here; the pre-training objective's sharded loss
and gradients are held to one device in tests/losses/test_pretrain.py, and the step itself
does not depend on the objective. Also the run's random key (`train.rng`)."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest

from medvqa_jax.train import sharding, step as step_lib

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{root!r}, {tests!r}, {helpers!r}]
    import helpers
    os.environ["XLA_FLAGS"] = helpers.xla_flags(8)
    import jax, numpy as np
    from test_pretrain import batch
    from medvqa_jax.models import amif
    from medvqa_jax.train import optim, sharding, step as step_lib
    assert jax.device_count() == 8

    # train.fsdp=k on 8 devices: a (8/k data) x (k fsdp) mesh, parameters split k-way (a
    # transposed layout would shard them 8/k-way); a k that does not divide 8 is refused.
    for k in (1, 2, 4, 8):
      assert dict(sharding.make_mesh(k).shape) == {{"data": 8 // k, "fsdp": k}}, k
    try:
      sharding.make_mesh(3)
      raise AssertionError("make_mesh(3) on 8 devices was accepted")
    except ValueError as e:
      assert "8 devices cannot be split 3-way" in str(e), e
    print("OK mesh")

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
      # The program that ran (jit's own cache: not compiled again).
      hlo = train_step.lower(state, sharding.shard_batch(mesh, data),
                             jax.random.PRNGKey(0)).compile().as_text()
      return jax.device_get(state["params"]), jax.device_get(metrics), shardings, hlo

    # The reference: one device, the config's AdamW, the whole batch per step. Against it:
    # fsdp=4 on 8 devices (2-way data parallel x 4-way parameter sharding, the optimizer
    # state sharded like the params) with the batch split into two micro-batches.
    from medvqa_jax.models.state_dict import flatten
    config = helpers.tiny_config()
    # Without dropout: micro-batches draw it from keys of their own, so accumulation changes
    # the draws (a layout alone does not: the two-process run of test_loop.py has dropout).
    config.model.dropout = 0.0
    config.optim.update(lr=1e-3, total_steps=10)
    model, params = amif.create(config)
    objective = step_lib.finetune_objective(
        model, np.arange(2000, 2064, dtype=np.int32), (np.arange(64) < 40).astype(np.int32))
    data = finetune_batch(16, 4)
    tx = optim.make(config.optim, params)
    one_device = sharding.make_mesh(1, devices=jax.devices()[:1])
    ref_params, ref_metrics, _, _ = run(objective, params, tx, data, one_device)
    moved = max(float(np.max(np.abs(a - b))) for a, b in
                zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)))
    assert moved > 1e-4  # The updates are large enough for the check to bite.
    got_params, got_metrics, sh, hlo = run(objective, params, tx, data,
                                           sharding.make_mesh(4), accum=2)
    for part in ("params", "opt_state"):
      specs = [s.spec for s in jax.tree.leaves(sh[part])]
      assert any("fsdp" in str(spec) for spec in specs), f"no {{part}} were FSDP-sharded"
    assert set(got_metrics) == set(ref_metrics) and "grad_norm" in got_metrics
    for k in ref_metrics:  # The second step's loss reflects the first step's update.
      np.testing.assert_allclose(got_metrics[k], ref_metrics[k], rtol=1e-5, atol=1e-6,
                                 err_msg=k)
    # The loss and gradient norm (above, 1e-5) hold the gradients to the reference at any
    # scale (Adam's updates would hide a scaled gradient). The params are held to a tenth of
    # one step's learning rate, but for rounding-tipped elements (helpers.assert_params_close:
    # here one, whose gradient is 2.4e-8 against a mean of 1e-2 in its array, 3.8e-4 apart),
    # within the two steps' learning rates.
    helpers.assert_params_close(flatten(got_params), flatten(ref_params), 1e-4, 2 * 1e-3)
    print("OK finetune", float(ref_metrics["loss"]), moved)

    # FSDP compiles to gathered weights and one gradient reduction: no activations moved
    # between devices (left to itself, the partitioner kept the weights sharded through the
    # layers: 41 all-to-alls and 36 all-reduces of activations in this step). Read in the
    # accumulated step that ran: its all-reduces are the gradients, the micro-batches'
    # example counts and two of scalars (the metrics, the gradient norm's partial sums).
    import re
    ops = re.findall(r"%\\S+ = .*? (all-gather|all-reduce|reduce-scatter|all-to-all|"
                     r"collective-permute)(?:-start)?\\(", hlo)
    count = {{op: ops.count(op) for op in set(ops)}}
    assert count.get("all-gather", 0) > 0, count
    assert count.get("all-to-all", 0) == 0 and count.get("collective-permute", 0) == 0, count
    assert count.get("all-reduce", 0) + count.get("reduce-scatter", 0) <= 4, count
    print("OK fsdp", count)

    # Micro-batches interleave rows, so each stays spread over every device: splitting a
    # batch sharded over 8 devices moves nothing between them.
    rows = np.arange(64 * 3).reshape(64, 3)
    x = sharding.shard_batch(sharding.make_mesh(1), {{"x": rows}})["x"]
    split = jax.jit(lambda v: step_lib.micro_batches({{"x": v}}, 4)["x"])
    hlo = split.lower(x).compile().as_text()
    assert not any(op in hlo for op in ("all-gather", "all-to-all", "collective-permute")), hlo
    np.testing.assert_array_equal(np.asarray(split(x))[1], rows[1::4])
    print("OK micro-batches")

    # Evaluation reads FSDP-sharded parameters gathered, as the step does: in bf16 its scores
    # are those of the replicated layout, bit for bit (they once differed by about 1%).
    from medvqa_jax.data import tokenizer as tokenizer_lib
    from medvqa_jax.evaluate import vqa
    config = helpers.tiny_config()
    config.optim.total_steps = 10
    config.model.dtype = config.model.image.dtype = config.model.text.dtype = "bfloat16"
    # bf16 computes with float32 parameters: the float32 model's, not initialised again.
    model, shapes = amif.create(config, abstract=True)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), shapes) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params)
    tok = tokenizer_lib.from_config(config.model.text)
    qs = tok([f"is there a thing number {{i}}" for i in range(16)])
    size = config.model.image.arch.image_size
    data = {{"images": np.random.default_rng(0).integers(0, 255, (16, size, size, 3), np.uint8),
            "input_ids": qs["input_ids"], "attention_mask": qs["attention_mask"]}}
    tx = optim.make(config.optim, params)
    scores = []
    for fsdp in (1, 4):
      mesh = sharding.make_mesh(fsdp)
      shardings = step_lib.state_shardings(mesh, params, tx, min_size=64)
      predictor = vqa.Predictor(model, config, ["yes", "no", "left lung"], tok, mesh,
                                shardings["params"])
      scores.append(predictor(jax.device_put(params, shardings["params"]),
                              sharding.shard_batch(mesh, data))[1])
    assert model.head == "generative" and scores[0].dtype == np.float32
    np.testing.assert_array_equal(scores[0], scores[1])
    print("OK predictor fsdp")
    """)


def test_sharded_step_equals_single_device():
  code = SCRIPT.format(root=str(ROOT), tests=str(ROOT / "tests" / "losses"),
                       helpers=str(ROOT / "tests"))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=1200, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-5000:]
  assert "OK mesh" in out.stdout
  assert "OK finetune" in out.stdout and "OK micro-batches" in out.stdout
  assert "OK fsdp" in out.stdout and "OK predictor fsdp" in out.stdout


def test_batches_the_objective_cannot_use_are_refused():
  from medvqa_jax.train import step as step_lib
  sys.path.insert(0, str(ROOT / "tests"))
  import helpers
  config = helpers.tiny_config()
  config.train.accum_steps = 2
  step_lib.check_batch(config, 16, 4)  # Fine-tuning accumulates exactly.
  with pytest.raises(ValueError, match=r"divisible by the device count \(4\) times "
                     r"train.accum_steps \(2\)"):
    step_lib.check_batch(config, 12, 4)
  config.model.head = "none"  # Pre-training: losses over the whole global batch.
  with pytest.raises(ValueError, match="train.accum_steps > 1 would train another objective"):
    step_lib.check_batch(config, 16, 4)
  config.train.accum_steps = 1
  step_lib.check_batch(config, 2, 1)
  with pytest.raises(ValueError, match="at least 2 examples per batch"):
    step_lib.check_batch(config, 1, 1)


def test_accumulation_weights_micro_batches_by_their_counted_examples():
  """The classifier's loss is a mean over the labels in its vocabulary only (-1: outside it),
  so micro-batches holding different numbers of them must count by those numbers: with
  three of four labels known in one micro-batch and one in the other, a plain average of the
  two means is another step (measured here: loss 2.89 against the batch's 3.21). The
  accumulated SGD step equals the whole batch's step. A micro-batch with no known label adds
  nothing."""
  import jax
  import numpy as np
  import optax
  sys.path.insert(0, str(ROOT / "tests"))
  import helpers
  from medvqa_jax.models import amif
  from medvqa_jax.train import sharding, step as step_lib

  config = helpers.tiny_config()
  config.model.dropout = 0.0
  config.model.update(head="classifier", num_answers=11)
  model, params = amif.create(config)
  rng = np.random.default_rng(0)
  n, q = 8, 10
  data = dict(images=rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
              input_ids=rng.integers(1000, 5000, (n, q)).astype(np.int32),
              attention_mask=np.ones((n, q), np.int32))
  objective = step_lib.finetune_objective(
      model, np.arange(2000, 2016, dtype=np.int32), np.ones(16, np.int32))
  tx = optax.sgd(1.0)
  mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
  shardings = step_lib.state_shardings(mesh, params, tx)

  def step(labels, accum):
    state = step_lib.init_state(params, tx, shardings)
    train_step = step_lib.make_train_step(objective, tx, shardings, accum)
    state, metrics = train_step(state, {**data, "labels": np.asarray(labels, np.int32)},
                                jax.random.PRNGKey(0))
    update = jax.tree.map(lambda a, b: np.asarray(a) - np.asarray(b), state["params"], params)
    return jax.device_get(metrics), update

  def assert_same(got, want):
    assert set(got[0]) == {"loss", "grad_norm"}  # The count is not reported.
    for k in want[0]:
      np.testing.assert_allclose(got[0][k], want[0][k], rtol=1e-5, err_msg=k)
    # The updates (the gradients: SGD at rate 1) are differences of parameters of size up to
    # 1, so they are as exact as float32 rounding there (6e-8): 1e-6.
    for a, b in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
      np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)

  # Micro-batch i of 2 is rows i, i + 2, ...: rows 0, 2, 4 (micro-batch 0) and 1 known.
  labels = [3, 7, 5, -1, 10, -1, -1, -1]
  whole = step(labels, 1)
  assert_same(step(labels, 2), whole)
  # The same data through the plain mean of the two micro-batch means: another step.
  known = np.array(labels) >= 0
  jitted = jax.jit(objective)  # Both halves: one compiled shape.
  plain = [float(jitted(params, {**{k: v[i::2] for k, v in data.items()},
                                 "labels": np.array(labels[i::2], np.int32)},
                        jax.random.PRNGKey(0))[0]) for i in (0, 1)]
  assert abs(np.mean(plain) - whole[0]["loss"]) > 1e-2, (plain, whole[0]["loss"])
  assert known[0::2].sum() == 3 and known[1::2].sum() == 1
  # All known labels in one micro-batch: the other, with none, adds nothing.
  labels = [3, -1, 5, -1, 10, -1, 2, -1]
  assert_same(step(labels, 2), step(labels, 1))
  # Answer 0 is a known label like any other (three in micro-batch 0, one in 1).
  labels = [0, 7, 0, -1, 0, -1, -1, -1]
  assert_same(step(labels, 2), step(labels, 1))
  # No known label in the whole step: no update, a gradient norm of 0 (not 0 / 0, a NaN
  # that the loop would stop as a diverged run).
  metrics, update = step([-1] * 8, 2)
  assert metrics["grad_norm"] == 0 and all(not np.any(u) for u in jax.tree.leaves(update))
  # Micro-batch i holds rows i, i + 2, ... (each device keeps its rows: none move).
  rows = step_lib.micro_batches({"row": np.arange(8)}, 2)["row"]
  np.testing.assert_array_equal(rows, [[0, 2, 4, 6], [1, 3, 5, 7]])


def test_the_generative_objective_counts_the_answers_it_trains_on():
  """An answer that normalises to "" ([CLS] [SEP] alone) is left out of the generative loss,
  and of the examples that weight a micro-batch under accumulation, as a classifier's label
  outside its vocabulary is."""
  import jax
  import numpy as np
  sys.path.insert(0, str(ROOT / "tests"))
  import helpers
  from medvqa_jax.models import amif
  from medvqa_jax.train import step as step_lib

  config = helpers.tiny_config()
  config.model.dropout = 0.0
  model, params = amif.create(config)
  assert model.head == "generative"
  rng = np.random.default_rng(0)
  n = 4
  answer_ids = np.zeros((n, 6), np.int32)
  answer_ids[:, 0], answer_ids[:, 3] = 101, 102
  answer_ids[:, 1:3] = rng.integers(1000, 5000, (n, 2))
  answer_ids[1, 1:] = [102, 0, 0, 0, 0]  # Empty.
  data = dict(images=rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
              input_ids=rng.integers(1000, 5000, (n, 10)).astype(np.int32),
              attention_mask=np.ones((n, 10), np.int32), answer_ids=answer_ids,
              answer_mask=(answer_ids > 0).astype(np.int32))
  objective = jax.jit(step_lib.finetune_objective(
      model, np.arange(2000, 2016, dtype=np.int32), np.ones(16, np.int32)))
  loss, metrics = objective(params, data, jax.random.PRNGKey(0))
  assert int(metrics[step_lib.EXAMPLES]) == 3
  # The loss is the mean over the other three (one compiled shape: rows made copies of
  # example 0): 4 x (the empty one made example 0) = 3 x loss + (all made example 0).
  def rows(batch, which):
    return {k: v[np.asarray(which)] for k, v in batch.items()}
  filled, _ = objective(params, rows(data, [0, 0, 2, 3]), jax.random.PRNGKey(0))
  first, m = objective(params, rows(data, [0, 0, 0, 0]), jax.random.PRNGKey(0))
  assert int(m[step_lib.EXAMPLES]) == 4
  np.testing.assert_allclose(4 * float(filled), 3 * float(loss) + float(first), rtol=1e-5)


def test_the_default_key_draws_what_the_raw_threefry_key_drew():
  """train.rng="threefry" (the default) keeps the runs' draws: the key data is
  jax.random.PRNGKey(seed)'s, and as the step's key it folds and draws the same."""
  data, raw = step_lib.base_key(7), jax.random.PRNGKey(7)
  np.testing.assert_array_equal(data, raw)
  key = step_lib.as_key(jax.numpy.asarray(data))
  assert step_lib.as_key(key) is key
  np.testing.assert_array_equal(jax.random.key_data(jax.random.fold_in(key, 3)),
                                jax.random.fold_in(raw, 3))
  np.testing.assert_array_equal(jax.random.bernoulli(jax.random.fold_in(key, 3), 0.9, (64,)),
                                jax.random.bernoulli(jax.random.fold_in(raw, 3), 0.9, (64,)))


def test_rbg_keys_draw_their_own_masks_the_same_each_time():
  mesh = sharding.make_mesh()
  draw = jax.jit(lambda data, i, rng: jax.random.bernoulli(
      jax.random.fold_in(step_lib.as_key(data, rng), i), 0.5, (256,)), static_argnums=2)
  rbg = step_lib.base_key(7, "rbg", mesh)
  assert rbg.shape == jax.random.key_data(jax.random.key(0, impl="rbg")).shape == (4,)
  np.testing.assert_array_equal(draw(rbg, 3, "rbg"),
                                draw(step_lib.base_key(7, "rbg", mesh), 3, "rbg"))
  assert (np.asarray(draw(rbg, 3, "rbg")) != np.asarray(
      draw(step_lib.base_key(7, mesh=mesh), 3, "threefry"))).any()
  assert (np.asarray(draw(rbg, 3, "rbg")) != np.asarray(draw(rbg, 4, "rbg"))).any()
  with pytest.raises(ValueError, match=r"unknown train.rng 'philox'; expected one of "
                                       r"\['rbg', 'threefry', 'unsafe_rbg'\]"):
    step_lib.base_key(0, "philox")


@pytest.mark.parametrize("accum", [1, 2])
def test_each_step_draws_from_the_run_key_folded_with_its_number(accum):
  """Dropout and the ITM negatives draw from the step's own key: the run's key folded with the
  step number (and split per micro-batch), so that every step draws anew, and a resumed run
  draws what the uninterrupted one did."""
  import optax
  mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
  params = {"w": jax.numpy.zeros(4)}
  tx = optax.sgd(0.0)
  shardings = step_lib.state_shardings(mesh, params, tx)

  def objective(params, batch, key):
    draw = jax.random.uniform(key, (4,))
    return (params["w"] * draw).sum() + batch["x"].sum(), {"loss": params["w"].sum(),
                                                            "draw": draw}

  train_step = step_lib.make_train_step(objective, tx, shardings, accum)
  state = step_lib.init_state(params, tx, shardings)
  data = step_lib.base_key(7)
  draws = []
  for s in range(3):
    state, metrics = train_step(state, {"x": np.zeros((2, 1), np.float32)}, data)
    draws.append(np.asarray(metrics["draw"]))
    key = jax.random.fold_in(jax.random.PRNGKey(7), s)
    keys = [key] if accum == 1 else list(jax.random.split(key, accum))
    want = np.mean([jax.random.uniform(k, (4,)) for k in keys], axis=0)
    np.testing.assert_allclose(draws[-1], want, rtol=1e-6)
  assert len({d.tobytes() for d in draws}) == 3
