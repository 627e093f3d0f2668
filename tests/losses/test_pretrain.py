"""The whole pre-training objective: terms, sharding over 8 devices, and the two stages."""

import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import optax
import pytest

import helpers
from medvqa_jax.data import device_augment
from medvqa_jax.losses import itm
from medvqa_jax.losses.pretrain import pretrain_loss, pretrain_terms
from medvqa_jax.models import amif
from medvqa_jax.train import optim

ROOT = Path(__file__).resolve().parents[2]


def tiny_config(stage):
  from configs import pretrain_stage0, pretrain_stage1
  config = helpers.tiny_config()
  stage_cfg = (pretrain_stage0 if stage == 0 else pretrain_stage1).get_config(
      "image=tiny,text=tiny,teacher=tiny")
  config.model.head = "none"
  config.losses = stage_cfg.losses
  config.optim = stage_cfg.optim
  config.optim.update(lr=1e-3, total_steps=10)
  return config


def batch(n=8, seed=0):
  rng = np.random.default_rng(seed)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  lengths = rng.integers(4, 11, n)
  ids = np.where(np.arange(10) < lengths[:, None], rng.integers(1000, 5000, (n, 10)), 0)
  return dict(images=rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
              images2=rng.normal(size=(n, 32, 32, 3)).astype(np.float32),
              input_ids=ids.astype(np.int32),
              attention_mask=(np.arange(10) < lengths[:, None]).astype(np.int32),
              teacher_image=unit(rng.normal(size=(n, 8))), teacher_text=unit(rng.normal(size=(n, 8))),
              teacher_scale=np.float32(85.0))


@pytest.fixture(scope="module")
def stage1():
  config = tiny_config(1)
  return (config, *amif.create(config))


def test_total_is_the_weighted_sum_of_the_terms(stage1):
  config, model, params = stage1
  loss, m = jax.jit(lambda p, b, k: pretrain_loss(model, p, b, k, config.losses))(
      params, batch(), jax.random.PRNGKey(0))
  w = config.losses.weights
  assert set(m) >= {"itgc", "imvc", "utgc", "wpa", "itm", "wpa_converged", "itm_accuracy",
                    "temperature_itgc"}
  expected = sum(w[k] * m[k] for k in ("itgc", "imvc", "utgc", "wpa", "itm"))
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(m["temperature_itgc"], 0.07, rtol=1e-6)


def test_an_ablation_counts_the_terms_it_keeps(stage1):
  """With one fusion loss switched off the other still runs (fusion runs for either), and a
  term the weights leave out counts for nothing: the total is the weighted sum of the terms
  named, each computed as in the full objective; a term left out is not reported (the
  text-text term was, whether named or not, as if it trained)."""
  config, model, params = stage1
  terms = ("itgc", "imvc", "utgc", "wpa", "itm")
  full = jax.jit(lambda p, b, k: pretrain_loss(model, p, b, k, config.losses))(
      params, batch(), jax.random.PRNGKey(0))[1]
  for kept in (("itgc", "imvc", "utgc", "wpa"), ("itgc", "imvc", "utgc", "itm"),
               ("itgc", "wpa"), ("imvc", "itm")):
    losses = config.losses.copy_and_resolve_references()
    # Left out, or weighted 0 (as towers_only's config does).
    losses.weights = {k: config.losses.weights[k] if k in kept else 0.0 for k in terms
                      if k in kept or "wpa" in kept}
    loss, m = jax.jit(lambda p, b, k: pretrain_loss(model, p, b, k, losses))(
        params, batch(), jax.random.PRNGKey(0))
    fused = [t for t in ("wpa", "itm") if t in kept]
    assert {t for t in terms if t in m} == set(kept)
    np.testing.assert_allclose(m[fused[0]], full[fused[0]], rtol=1e-5)
    expected = sum(losses.weights[t] * full[t] for t in losses.weights)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_dropout_and_the_itm_negatives_draw_from_different_keys(stage1, monkeypatch):
  # With partitionable threefry, fold_in(key, 1) equals split(key)[1]: dropout once drew from
  # the very key that sampled the negative images.
  config, model, params = stage1
  losses = config.losses.copy_and_resolve_references()
  losses.itm.negative_images = True
  drawn = []  # The keys, traced: the jitted function returns them.
  sample = itm.sample_negatives
  monkeypatch.setattr(itm, "sample_negatives",
                      lambda key, *a: drawn.append(key) or sample(key, *a))
  apply = type(model).apply
  monkeypatch.setattr(type(model), "apply", lambda self, *a, rngs=None, **kw: (
      drawn.append(rngs["dropout"]), apply(self, *a, rngs=rngs, **kw))[1])
  keys = jax.jit(lambda p, b, k: (pretrain_loss(model, p, b, k, losses), list(drawn))[1])(
      params, batch(), jax.random.PRNGKey(0))
  assert len(keys) == 3  # Negative texts, negative images, dropout.
  assert len({tuple(np.asarray(jax.random.key_data(k)).ravel()) for k in keys}) == 3


@pytest.mark.parametrize("alike", ["caption", "picture"])
def test_itm_negatives_leave_out_examples_of_the_same_caption_or_picture(stage1, monkeypatch,
                                                                          alike):
  """Examples 0 and 1 have the same caption (tokens and length), or are two captions of one
  picture (the same `image_key`, and here the same pixels): the objective passes the
  captions' and the pictures' keys to the sampler, which never pairs one's image with the
  other's text."""
  config, model, params = stage1
  losses = config.losses.copy_and_resolve_references()
  losses.itm.negative_images = True
  b = batch()
  b["image_key"] = np.arange(8, dtype=np.uint32)
  if alike == "caption":
    for k in ("input_ids", "attention_mask"):
      b[k][1] = b[k][0]
  else:
    b["image_key"][1] = b["image_key"][0]
    for k in ("images", "images2"):
      b[k][1] = b[k][0]
  seen = []
  sample = itm.hard_negative_pairs
  monkeypatch.setattr(itm, "hard_negative_pairs",
                      lambda *a: (lambda out: seen.append(out) or out)(sample(*a)))
  run = jax.jit(lambda p, b, k: (pretrain_loss(model, p, b, k, losses),
                                 itm.pair_indices(seen[-1], len(b["images"])))[1])
  pairs = set()
  for s in range(40):
    text_idx, image_idx = map(np.asarray, run(params, b, jax.random.PRNGKey(s)))
    pairs |= set(zip(text_idx.tolist(), image_idx.tolist()))
  assert (0, 1) not in pairs and (1, 0) not in pairs
  assert len(pairs) > 20  # Other negatives were drawn (an 8 x 8 batch has 56).



def test_a_batch_of_one_caption_trains_itm_on_its_positives_only(stage1):
  """Every example has the same caption: no text is another image's mismatch, so the drawn
  negatives (the fallback) are left out and the ITM term is the positives' cross-entropy."""
  config, model, params = stage1
  b = batch()
  for k in ("input_ids", "attention_mask"):
    b[k][:] = b[k][0]
  run = jax.jit(lambda p, b, k: pretrain_terms(model, p, b, k, config.losses))
  loss, m, out = run(params, b, jax.random.PRNGKey(0))
  logits = np.asarray(out["itm_logits"], np.float64)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  np.testing.assert_allclose(m["itm"], -logp[:, 1].mean(), rtol=1e-5)
  assert out["pair_itm_logits"].shape[0] == 8  # Drawn, then left out.


def test_a_batch_of_one_picture_trains_itm_on_its_positives_only(stage1):
  """Every example is a caption of one picture (one `image_key`: a multi-caption corpus, a
  small batch): no text is its image's mismatch, so the drawn negatives are left out here too
  and the ITM term is the positives' cross-entropy."""
  config, model, params = stage1
  b = batch()
  assert len({r.tobytes() for r in b["input_ids"]}) == 8  # Different captions,
  b["image_key"] = np.zeros(8, np.uint32)                  # of one picture.
  run = jax.jit(lambda p, b, k: pretrain_terms(model, p, b, k, config.losses))
  loss, m, out = run(params, b, jax.random.PRNGKey(0))
  logp = _log_softmax(np.asarray(out["itm_logits"], np.float64))
  np.testing.assert_allclose(m["itm"], -logp[:, 1].mean(), rtol=1e-5)


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_soft_label(a, b, ta, tb, s, tau, lam, symmetric=True):
  """KL(softmax(s * ta tb^T + lam I) || softmax(a b^T / tau)), rows averaged (float64); both
  directions averaged when symmetric."""
  a, b, ta, tb = (np.asarray(x, np.float64) for x in (a, b, ta, tb))
  eye = lam * np.eye(len(a))

  def kl(target, logits):
    target, logits = _log_softmax(target), _log_softmax(logits)
    return np.mean(np.sum(np.exp(target) * (target - logits), -1))

  one = kl(s * ta @ tb.T + eye, a @ b.T / tau)
  return 0.5 * (one + kl(s * tb @ ta.T + eye, b @ a.T / tau)) if symmetric else one


def test_global_terms_follow_the_batch_teacher_fields():
  """itgc, imvc and utgc, recomputed in NumPy from the student embeddings the model returns
  and the batch's teacher_image / teacher_image2 / teacher_text / teacher_scale: each field
  reaches the term it belongs to (swapping two of them changes the terms)."""
  config = tiny_config(0)
  config.model.dropout = 0.0
  model, params = amif.create(config)
  rng = np.random.default_rng(3)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  # Texts in two tight clusters, images spread out: each teacher's similarities differ.
  clustered = unit(rng.normal(size=(2, 8))[np.arange(8) % 2] + 0.3 * rng.normal(size=(8, 8)))
  data = dict(batch(), teacher_text=clustered, teacher_image2=unit(rng.normal(size=(8, 8))),
              teacher_scale=np.float32(20.0))
  _, m, out = jax.jit(lambda p, b: pretrain_terms(model, p, b, jax.random.PRNGKey(0),
                                                  config.losses, train=False))(params, data)
  lam, s = config.losses.lam, 20.0
  image, image2, text = out["image_embed"], out["image2_embed"], out["text_embed"]
  t_image, t_image2, t_text = data["teacher_image"], data["teacher_image2"], data["teacher_text"]
  tau = lambda k: float(m[f"temperature_{k}"])
  want = {"itgc": _np_soft_label(image, text, t_image, t_text, s, tau("itgc"), lam),
          "imvc": _np_soft_label(image, image2, t_image, t_image2, s, tau("imvc"), lam),
          "utgc": _np_soft_label(text, text, t_text, t_text, s, tau("utgc"), lam,
                                 symmetric=False)}
  for k, v in want.items():
    np.testing.assert_allclose(m[k], v, rtol=2e-4, atol=1e-5, err_msg=k)
  # The fields are told apart: swapped teachers give other values.
  swapped = {"itgc": _np_soft_label(image, text, t_text, t_image, s, tau("itgc"), lam),
             "imvc": _np_soft_label(image, image2, t_image2, t_image, s, tau("imvc"), lam),
             "utgc": _np_soft_label(text, text, t_image, t_image, s, tau("utgc"), lam,
                                    symmetric=False)}
  for k in want:
    assert abs(swapped[k] - want[k]) > 0.05 * abs(want[k]), k


def test_without_a_teacher_the_global_terms_take_the_configs_label_smoothing(stage1):
  """The hard-label ablation (a batch without teacher fields): itgc and imvc are InfoNCE with
  targets (1 - eps) I + eps / n, eps the config's losses.label_smoothing (the reference's
  0.1), recomputed in NumPy from the embeddings the model returns; utgc has no hard-label
  form and is left out."""
  config, model, params = stage1
  losses = config.losses.copy_and_resolve_references()
  losses.weights.update(wpa=0.0, itm=0.0)
  assert losses.label_smoothing == 0.1
  data = {k: v for k, v in batch().items() if not k.startswith("teacher_")}
  _, m, out = jax.jit(lambda p, b: pretrain_terms(model, p, b, None, losses, train=False))(
      params, data)
  assert "utgc" not in m

  def info_nce(a, b, tau, eps):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    target = (1 - eps) * np.eye(len(a)) + eps / len(a)
    ce = lambda logits: np.mean(-np.sum(target * _log_softmax(logits), -1))
    return 0.5 * (ce(a @ b.T / tau) + ce(b @ a.T / tau))

  for name, (x, y) in {"itgc": ("image_embed", "text_embed"),
                       "imvc": ("image_embed", "image2_embed")}.items():
    tau = float(m[f"temperature_{name}"])
    np.testing.assert_allclose(m[name], info_nce(out[x], out[y], tau, 0.1), rtol=1e-4,
                               err_msg=name)
    assert abs(info_nce(out[x], out[y], tau, 0.0) - float(m[name])) > 1e-3, name


def test_itm_negatives_are_drawn_at_the_image_text_temperature(stage1, monkeypatch):
  """The hard negatives follow softmax(similarity / tau) with itgc's learned temperature
  (the image-text one), not imvc's or utgc's: here the three differ."""
  config, model, params = stage1
  params = {**params, "temperatures": {k: np.log(np.float32(v)) for k, v in
                                       (("itgc", 0.03), ("imvc", 0.2), ("utgc", 0.5))}}
  seen = []
  sample = itm.hard_negative_pairs
  monkeypatch.setattr(itm, "hard_negative_pairs",
                      lambda key, image, text, tau, *a: seen.append(tau) or sample(
                          key, image, text, tau, *a))
  m, tau = jax.jit(lambda p, b, k: (pretrain_terms(model, p, b, k, config.losses)[1],
                                    seen[-1]))(params, batch(), jax.random.PRNGKey(0))
  np.testing.assert_allclose([m["temperature_itgc"], m["temperature_imvc"],
                              m["temperature_utgc"]], [0.03, 0.2, 0.5], rtol=1e-5)
  assert float(tau) == float(m["temperature_itgc"])


def test_the_views_blur_is_applied_on_device():
  """The pipeline's blur sigmas (`blur`, `blur2`) blur the views inside the loss: the same
  loss as views blurred beforehand; zero sigmas change nothing."""
  config = tiny_config(0)
  config.model.dropout = 0.0  # The blur's effect alone.
  assert config.losses.weights.imvc > 0  # Both views are encoded.
  model, params = amif.create(config)
  rng = np.random.default_rng(1)
  plain = dict(batch(), images=rng.integers(0, 256, (8, 32, 32, 3), np.uint8),
               images2=rng.integers(0, 256, (8, 32, 32, 3), np.uint8))
  s1, s2 = (np.where(np.arange(8) % 2, rng.uniform(0.1, 2.0, 8), 0).astype(np.float32)
            for _ in range(2))
  loss = jax.jit(lambda b: pretrain_loss(model, params, b, jax.random.PRNGKey(0),
                                         config.losses)[0])
  before = dict(plain, images=device_augment.gaussian_blur(plain["images"], s1),
                images2=device_augment.gaussian_blur(plain["images2"], s2))
  # Compiled apart (other batch keys), the two programs round differently: 1e-4.
  np.testing.assert_allclose(loss(dict(plain, blur=s1, blur2=s2)), loss(before), rtol=1e-4)
  zeros = np.zeros(8, np.float32)
  np.testing.assert_allclose(loss(dict(plain, blur=zeros, blur2=zeros)), loss(plain),
                             rtol=1e-4)
  assert abs(float(loss(before)) / float(loss(plain)) - 1) > 1e-3


@pytest.mark.parametrize("stage", [0, 1])
def test_stage_freezing(stage):
  """Stage 1 leaves the encoders bit-identical after an update and trains fusion; stage 0
  trains the encoders and leaves fusion as it was. The train step's mask (frozen parameters
  behind stop_gradient, so that their backward pass is never computed) gives zero gradients
  to exactly the frozen parameters and the same gradients to the others."""
  from medvqa_jax.train import step as step_lib
  config = tiny_config(stage)
  model, params = amif.create(config)
  tx = optim.make(config.optim, params)
  state = tx.init(params)
  loss = lambda p, b: pretrain_loss(model, p, b, jax.random.PRNGKey(1), config.losses)
  frozen = optim.frozen_mask(config.optim, params)
  grad = lambda f: jax.jit(jax.grad(lambda p, b: f(p, b)[0]))(params, batch())
  grads, masked = grad(loss), grad(step_lib.freeze(loss, frozen))
  for g, m, f in zip(jax.tree.leaves(grads), jax.tree.leaves(masked), jax.tree.leaves(frozen)):
    if f:
      assert not np.any(m)
    else:
      np.testing.assert_allclose(m, g, rtol=1e-5, atol=1e-7)
  assert any(jax.tree.leaves(frozen)) and not all(jax.tree.leaves(frozen))
  new = params
  update = jax.jit(lambda g, s, p: tx.update(g, s, p))  # Op by op: a compile per shape.
  for _ in range(2):  # The first step's learning rate is 0 (warm-up starts at 0).
    updates, state = update(grads, state, new)
    new = optax.apply_updates(new, updates)
  same = lambda part: all(np.array_equal(a, b) for a, b in
                          zip(jax.tree.leaves(params[part]), jax.tree.leaves(new[part])))
  if stage == 1:
    assert same("image") and same("text")
    assert not same("fusion") and not same("itm_head") and not same("text_proj")
  else:
    assert not same("image") and not same("text") and not same("image_proj")
    assert same("fusion") and same("itm_head")


SHARDED = textwrap.dedent("""
    import os, sys
    sys.path[:0] = [{root!r}, {tests!r}, {helpers!r}]
    import helpers
    os.environ["XLA_FLAGS"] = helpers.xla_flags(8)
    import jax, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from test_pretrain import batch, tiny_config
    from medvqa_jax.losses.pretrain import pretrain_loss, pretrain_terms
    from medvqa_jax.models import amif
    assert jax.device_count() == 8
    config = tiny_config(1)
    config.losses.itm.negative_images = True
    model, params = amif.create(config)
    data = batch(n=16, seed=5)
    key = jax.random.PRNGKey(7)
    f = jax.jit(jax.value_and_grad(
        lambda p, b, k: pretrain_loss(model, p, b, k, config.losses), has_aux=True))
    (loss1, m1), g1 = f(params, data, key)
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    shard = lambda x: jax.device_put(x, NamedSharding(mesh, P("data") if np.ndim(x) else P()))
    replicate = lambda x: jax.device_put(x, NamedSharding(mesh, P()))
    sharded = {{k: shard(v) for k, v in data.items()}}
    assert len(sharded["images"].sharding.device_set) == 8
    (loss8, m8), g8 = f(jax.tree.map(replicate, params), sharded, key)
    for k in m1:
      np.testing.assert_allclose(m8[k], m1[k], rtol=1e-5, atol=1e-6, err_msg=k)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(g1)[0], jax.tree.leaves(g8)):
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=str(path))

    # What moves between devices: of the token-sized arrays (B x tokens x width), only the
    # towers' outputs that the negatives take from the global batch, all-gathered. The pairs
    # are fused where their examples are (the matched and negative pairs were once joined
    # end to end, and their fused tokens permuted across devices, forward and backward), and
    # with the encoders frozen (stage 1) no gradient goes back through the gathers.
    import re
    from medvqa_jax.train import optim, step as step_lib, trace

    def token_collectives(fn):
      hlo = jax.jit(fn).lower(jax.tree.map(replicate, params), sharded, key).compile().as_text()
      tokens = lambda shape: any(len(d.split(",")) >= 3 and {{"10", "17"}} & set(d.split(","))
                                 for d in re.findall(r"\\[([\\d,]+)\\]", shape))
      return [(op, name) for op, shape, name in trace.collective_ops(hlo) if tokens(shape)]

    frozen = step_lib.freeze(lambda p, b, k: pretrain_loss(model, p, b, k, config.losses),
                             optim.frozen_mask(config.optim, params))
    moved = token_collectives(jax.value_and_grad(frozen, has_aux=True))
    assert sorted(op for op, _ in moved) == ["all-gather"] * 2, moved  # Text, image tokens.
    # Each is a tower's output: XLA names it after the negatives' take of it (jax 0.10) or
    # after the tower's last op (jax 0.11); a permute of fused tokens would be neither.
    assert all("_take)/gather" in name or "AMiF.encode_" in name for _, name in moved), moved
    # Trained towers take the gathers' gradients back: the check sees token-sized reductions.
    assert {{op for op, _ in token_collectives(f)}} - {{"all-gather"}}, "no reduction seen"
    print("OK", float(loss1), float(loss8))
    """)


def test_sharded_over_8_devices_equals_single_device():
  code = SHARDED.format(root=str(ROOT), tests=str(Path(__file__).parent),
                        helpers=str(Path(__file__).parents[1]))
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=900, cwd=ROOT)
  assert out.returncode == 0, out.stderr[-4000:]
  assert out.stdout.startswith("OK")
