"""The AMiF model: towers -> projections -> co-attention fusion (-> GCA -> answer head).

Entry points (Linen methods, `model.apply(variables, ..., method=AMiF.<name>)`):
  pretrain: global embeddings per view, fused token features of the matched pairs, ITM logits
            for the matched pairs and for caller-given (text, image) index pairs.
  vqa:      answer-head outputs and loss terms, with the intermediates (fused tokens, masks,
            gate values, attention weights).
  rank:     generative-head inference: top-k candidates by first-token probability, re-scored
            by full-sequence log-likelihood (or by the reference code's score, RANK_SCORES).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from medvqa_jax.models import heads, layers, state_dict
from medvqa_jax.models.bert import BertEncoder
from medvqa_jax.models.fusion import CoAttentionFusion
from medvqa_jax.models.gca import GatedCrossAttention

TEXT, IMAGE = 0, 1  # Modality-type embedding rows.
HEADS = ("generative", "classifier", "none")
# How `AMiF.rank` re-scores its top-k candidates (model.rank_score): "likelihood", the
# answer's log-likelihood, sum over t >= 1 of log p(t_i | t_<i), as DESIGN.md words it; or
# "first_token_twice", the paper's code's score (ALBEF's and BLIP's), which adds the first
# token's log-probability, that picked the k, to that sum once more: 2 log p(t_1) + sum over
# t >= 2 of log p(t_i | t_<i). The two pick different answers where a candidate's first word
# piece is much likelier than another's and its rest less likely.
RANK_SCORES = ("likelihood", "first_token_twice")


class Temperatures(nn.Module):
  """Learnable temperatures of the global contrastive losses, kept positive as exp(log t)."""
  initial: float = 0.07  # (Not `init`: that would hide Module.init.)
  names: tuple[str, ...] = ("itgc", "imvc", "utgc")

  @nn.compact
  def __call__(self):
    log_init = lambda key: jnp.log(jnp.asarray(self.initial, jnp.float32))
    return {n: jnp.exp(self.param(n, log_init)) for n in self.names}


class AMiF(nn.Module):
  image: nn.Module            # VisionTransformer
  text: nn.Module             # BertEncoder (pooler "cls") or ClipTextTransformer
  width: int = 768
  fusion_layers: int = 6
  num_heads: int = 12
  mlp_dim: int = 3072
  head: str = "generative"    # "generative", "classifier", or "none" (pre-training only)
  num_answers: int = 0        # classifier vocabulary size
  decoder: nn.Module | None = None  # BertEncoder(causal, cross_from, lm_head): generative head
  temperature_init: float = 0.07
  dtype: Any = jnp.float32
  compute: layers.Compute = layers.Compute()  # Fusion and GCA; the towers carry their own.
  dropout: float = 0.0  # The fusion's hidden dropout (training only); the BERTs carry their own.

  def setup(self):
    if self.head not in HEADS:
      raise ValueError(f"unknown head {self.head!r}; expected generative, classifier or none")
    if self.head == "generative" and self.decoder is None:
      raise ValueError("the generative head needs a decoder")
    if self.head == "classifier" and self.num_answers <= 0:
      raise ValueError("the classifier head needs num_answers > 0 (training sets it to the "
                       "size of the answer set; elsewhere pass --config.model.num_answers=N)")
    self.image_proj = nn.Dense(self.width, dtype=self.dtype)
    self.text_proj = nn.Dense(self.width, dtype=self.dtype)
    # In the compute dtype: the sum with the projected tokens, fusion's input, stays in it
    # (float32 before: twice the bytes, in the ITM negatives' gather too).
    self.type_embed = nn.Embed(2, self.width, dtype=self.dtype)
    self.fusion = CoAttentionFusion(self.fusion_layers, self.num_heads, self.mlp_dim,
                                    dtype=self.dtype, compute=self.compute,
                                    dropout=self.dropout)
    # In float32, as the ITM loss reads the logits (bf16 would round them to 3 digits).
    self.itm_head = nn.Dense(2, dtype=jnp.float32)
    self.temperatures = Temperatures(self.temperature_init)
    if self.head != "none":
      self.gca = GatedCrossAttention(self.num_heads, self.mlp_dim, dtype=self.dtype,
                                     compute=self.compute)
    if self.head == "classifier":
      self.classifier = heads.ClassifierHead(self.num_answers, dtype=self.dtype)

  # ---- unimodal ---------------------------------------------------------------------------

  def encode_image(self, images):
    out = self.image(images)
    return {**self.fusion_input(IMAGE, out["tokens"]),
            "embed": layers.l2_normalize(self.image_proj(out["pooled"])), "tower": out}

  def encode_text(self, input_ids, attention_mask):
    out = self.text(input_ids, attention_mask)
    return {**self.fusion_input(TEXT, out["tokens"], attention_mask),
            "embed": layers.l2_normalize(self.text_proj(out["pooled"])),
            "tower": {**out, "mask": attention_mask}}

  def fusion_input(self, kind, tokens, mask=None):
    """A tower's tokens projected, with the modality-type embedding: fusion's input."""
    proj = self.image_proj if kind == IMAGE else self.text_proj
    tokens = proj(tokens) + self.type_embed(jnp.array(kind))
    return {"tokens": tokens,
            "mask": jnp.ones(tokens.shape[:2], jnp.int32) if mask is None else mask}

  def word_embeddings(self, ids):
    """The text tower's input embedding table (no positions) looked up at `ids`; the text
    tower must have been called in the same method."""
    name = "word_embed" if isinstance(self.text, BertEncoder) else "token_embed"
    return jnp.take(self.text.variables["params"][name]["embedding"], ids, axis=0)

  # ---- fusion -----------------------------------------------------------------------------

  def fuse(self, text, image, return_weights=False):
    return self.fusion(text["tokens"], text["mask"], image["tokens"], image["mask"],
                       return_weights=return_weights)

  def itm_logits(self, fused):
    """Image-text matching logits (match = 1) on concat(fused text CLS, fused image CLS)."""
    cls = jnp.concatenate([fused["text"][:, 0], fused["image"][:, 0]], axis=-1)
    return self.itm_head(cls)

  def pretrain(self, images, input_ids, attention_mask, images2=None, pairs=None, fuse=True):
    """Pre-training outputs: global embeddings (`image_embed`, `image2_embed` for a second
    view, `text_embed`), the contrastive `temperature`s, and unless `fuse` is False the fused
    tokens of the matched pairs with their masks and ITM logits.

    pairs: extra pairs to score for ITM, as segments: a list of (text_idx, image_idx), each
      an int array (B,) or None for the batch's own examples in order, so that every segment
      pairs one text and one image with each example of the batch (`itm.hard_negative_pairs`
      gives them so); or a function of the outputs so far returning them (hard negatives are
      sampled from the embeddings of the same forward pass). Each text keeps its own
      attention mask.

    The matched and extra pairs go through fusion as one batch laid out by example (row
    b * S + s: segment s of example b, segment 0 the matched pair), so that under data
    parallelism each device fuses the pairs of its own examples: a segment's rows stay where
    the batch's are, and no fused activation moves between devices. An indexed side is
    gathered from the towers' outputs, before the projection: with a frozen tower (stage 1)
    the gather has no gradient to send back. Only the indexed sides are gathered.
    """
    image, text = self.encode_image(images), self.encode_text(input_ids, attention_mask)
    out = {"image_embed": image["embed"], "text_embed": text["embed"],
           "temperature": self.temperatures()}
    if images2 is not None:
      out["image2_embed"] = self.encode_image(images2)["embed"]
    if not fuse:
      return out
    if self.fusion_layers == 0:
      raise ValueError("the model has no fusion layers (model.fusion.layers=0), so the fusion "
                       "losses cannot be computed: set losses.weights.wpa and .itm to 0")
    if callable(pairs):
      pairs = pairs(out)
    b = images.shape[0]
    pairs = [tuple(None if idx is None else jnp.asarray(idx) for idx in segment)
             for segment in pairs or []]
    for n, segment in enumerate(pairs):
      for idx in segment:
        if idx is not None and tuple(idx.shape) != (b,):
          raise ValueError(f"pairs segment {n} holds indices of shape {tuple(idx.shape)}; "
                           f"each segment pairs the {b} examples of the batch: ({b},)")

    def side(kind, enc, idx):  # A segment's side, fusion's input: the batch's, or gathered.
      if idx is None:
        return {"tokens": enc["tokens"], "mask": enc["mask"]}
      take = lambda x: jnp.take(x, idx, axis=0)
      return self.fusion_input(kind, take(enc["tower"]["tokens"]),
                               None if kind == IMAGE else take(enc["tower"]["mask"]))

    def by_example(kind, enc, indices):  # Segments of (B, ...) -> (B * S, ...), row b*S + s.
      parts = [side(kind, enc, idx) for idx in [None] + indices]
      return {k: jnp.stack([p[k] for p in parts], axis=1).reshape((-1,) + parts[0][k].shape[1:])
              for k in parts[0]}

    s = len(pairs) + 1
    fused = self.fuse(by_example(TEXT, text, [t for t, _ in pairs]),
                      by_example(IMAGE, image, [i for _, i in pairs]))
    first = lambda x: x.reshape((b, s) + x.shape[1:])[:, 0]
    logits = self.itm_logits(fused).reshape(b, s, 2)
    out.update(fused_text=first(fused["text"]), fused_image=first(fused["image"]),
               text_mask=text["mask"], image_mask=image["mask"], itm_logits=logits[:, 0])
    if pairs:  # In the segments' order.
      out["pair_itm_logits"] = jnp.swapaxes(logits[:, 1:], 0, 1).reshape(-1, 2)
    return out

  # ---- VQA --------------------------------------------------------------------------------

  def context(self, images, input_ids, attention_mask, prior_ids, prior_mask,
              return_weights=False):
    """GCA output over concat(fused text, fused image) and its mask."""
    image, text = self.encode_image(images), self.encode_text(input_ids, attention_mask)
    fused = self.fuse(text, image, return_weights=return_weights)
    x = jnp.concatenate([fused["text"], fused["image"]], axis=1)
    mask = jnp.concatenate([text["mask"], image["mask"]], axis=1)
    gca = self.gca(x, self.word_embeddings(prior_ids), prior_mask, return_weights)
    out = {"context": gca["out"], "context_mask": mask, "gate": gca["gate"],
           "fused_text": fused["text"], "fused_image": fused["image"]}
    if return_weights:
      out["gca_weights"] = gca["cross_weights"]
      out["fusion_text_weights"] = fused["text_cross_weights"]
      out["fusion_image_weights"] = fused["image_cross_weights"]
    return out

  def decode(self, answer_ids, answer_mask, context, context_mask, segment_ids=None):
    return self.decoder(answer_ids, answer_mask, context=context, context_mask=context_mask,
                        segment_ids=segment_ids)["logits"]

  def lm_head_inputs(self, answer_ids, answer_mask, context, context_mask, segment_ids=None):
    """What the decoder's LM head makes its logits of, hidden (N, L, D) float32 @
    embedding.T (V, D) + bias (V,), without making them."""
    return self.decoder(answer_ids, answer_mask, context=context, context_mask=context_mask,
                        segment_ids=segment_ids, lm_logits=False)["lm"]

  def answer_log_probs(self, answer_ids, answer_mask, context, context_mask, segment_ids=None):
    """`decode`'s next-token log-probabilities, (N, L - 1) float32
    (`heads.next_token_log_prob`), without its (N, L, vocab) logits: they are made a few
    positions at a time (`heads.next_token_log_prob_chunked`)."""
    return heads.next_token_log_prob_chunked(
        *self.lm_head_inputs(answer_ids, answer_mask, context, context_mask, segment_ids),
        answer_ids)

  def vqa(self, images, input_ids, attention_mask, prior_ids, prior_mask, answer_ids=None,
          answer_mask=None, labels=None, return_weights=False):
    """Classifier: `labels` (B,) answer indices (-1: outside the vocabulary) give `loss`;
    `logits` (B, num_answers) and `prediction` always. Generative: `answer_ids`/`answer_mask`
    (B, La), [CLS] answer [SEP], give `token_logp` (B, La - 1), the log-probability of each
    answer token after the first given those before it (`heads.next_token_log_prob`), and
    the teacher-forced `loss`; `decode` gives the decoder's logits."""
    out = self.context(images, input_ids, attention_mask, prior_ids, prior_mask, return_weights)
    if self.head == "classifier":
      t = out["fused_text"].shape[1]  # The image CLS follows the text tokens.
      out["logits"] = self.classifier(out["context"][:, 0], out["context"][:, t])
      out["prediction"] = jnp.argmax(out["logits"], axis=-1)
      if labels is not None:
        out["loss"] = heads.classifier_loss(out["logits"], labels)
    elif answer_ids is not None:
      lm = self.lm_head_inputs(answer_ids, answer_mask, out["context"], out["context_mask"])
      out["token_logp"] = heads.next_token_log_prob(*lm, answer_ids)
      out["loss"] = heads.generative_loss(out["token_logp"], answer_mask)
    return out

  def rank(self, images, input_ids, attention_mask, prior_ids, prior_mask, cand_ids, cand_mask,
           k: int = 32, pack: int = 0, score: str = "likelihood"):
    """Ranks candidate answers (C, La) ([CLS] answer [SEP], shared by the batch): the top k by
    the probability of their first token, re-scored by `score` (RANK_SCORES): full-sequence
    log-likelihood, or the reference code's score, which counts the first token twice.

    pack: 0 decodes each question's k candidates as k rows of La tokens, mostly padding;
    otherwise (static, at least the k longest candidates' tokens: `heads.pack_length`) as
    one row of `pack` tokens that holds their real tokens one after another, each candidate
    read as if alone (positions restart, attention stays within it): the same scores for
    fewer decoded tokens.

    Returns prediction (B,) candidate indices, topk (B, k) candidate indices, scores (B, k)
    their log-likelihoods and ranking (B, k) what the prediction is the best of (`score`'s
    values: the log-likelihoods themselves, or those plus the first tokens' log-probability).
    """
    if self.head != "generative":
      raise ValueError("rank() is the generative head's inference")
    check_rank_score(score)
    ctx = self.context(images, input_ids, attention_mask, prior_ids, prior_mask)
    context, context_mask = ctx["context"], ctx["context_mask"]
    b, c = context.shape[0], cand_ids.shape[0]
    k = min(k, c)
    bos = jnp.broadcast_to(cand_ids[None, :1, 0], (b, 1))
    first = self.decode(bos, jnp.ones_like(bos), context, context_mask)[:, 0]
    first = jax.nn.log_softmax(first.astype(jnp.float32), axis=-1)
    first_logp, topk = jax.lax.top_k(jnp.take(first, cand_ids[:, 1], axis=-1), k)  # (B, k)
    if pack:
      if cand_ids.shape[1] > self.decoder.max_positions:
        raise ValueError(f"candidates of {cand_ids.shape[1]} tokens exceed the decoder's "
                         f"max_positions {self.decoder.max_positions}")
      ids, segments = heads.pack_candidates(cand_ids, cand_mask, topk, pack)
      token_logp = self.answer_log_probs(ids, None, context, context_mask, segment_ids=segments)
      scores = heads.packed_log_likelihood(token_logp, segments, k)
    else:
      ids = jnp.take(cand_ids, topk, axis=0).reshape(b * k, -1)
      mask = jnp.take(cand_mask, topk, axis=0).reshape(b * k, -1)
      # Each question's context is shared by its k candidates (consecutive rows): the
      # decoder's cross-attention projects it once per question, not once per candidate.
      token_logp = self.answer_log_probs(ids, mask, context, context_mask)
      scores = heads.sequence_log_likelihood(token_logp, mask).reshape(b, k)
    ranking = scores + first_logp if score == "first_token_twice" else scores
    best = jnp.argmax(ranking, axis=-1)
    return {"prediction": jnp.take_along_axis(topk, best[:, None], axis=-1)[:, 0],
            "topk": topk, "scores": scores, "ranking": ranking}


def check_rank_score(score: str) -> str:
  """`score` if it names a way to re-score (RANK_SCORES); an error naming them otherwise."""
  if score not in RANK_SCORES:
    raise ValueError(f"model.rank_score={score!r}: expected one of {', '.join(RANK_SCORES)}")
  return score


# ---- construction from a config ------------------------------------------------------------

def dummy_inputs(model: AMiF, config) -> dict:
  """Inputs of the shapes a config implies, for init and shape inference."""
  size, q = model.image.image_size, config.model.text.max_len
  batch = dict(images=jnp.zeros((1, size, size, 3), jnp.float32),
               input_ids=jnp.zeros((1, q), jnp.int32), attention_mask=jnp.ones((1, q), jnp.int32))
  if model.head == "none":
    return batch
  p = config.model.prior_max_tokens
  batch.update(prior_ids=jnp.zeros((p,), jnp.int32), prior_mask=jnp.ones((p,), jnp.int32))
  if model.head == "generative":
    a = config.model.answer_max_len
    batch.update(answer_ids=jnp.zeros((1, a), jnp.int32), answer_mask=jnp.ones((1, a), jnp.int32))
  return batch


def compute_of(config) -> layers.Compute:
  """The model's layers.Compute from `config.model.compute` (defaults where absent)."""
  return layers.Compute(**dict(config.model.get("compute", {})))


def head_dims(model: AMiF) -> list[int]:
  """The head dims of `model`'s attention layers: towers, fusion and GCA, decoder (what the
  attention kernel is chosen by, with the compute dtype: `layers.Compute.kernel`)."""
  stacks = [model.image, model.text, model.decoder]
  dims = {s.width // s.num_heads for s in stacks if s is not None}
  if model.fusion_layers or model.head != "none":
    dims.add(model.width // model.num_heads)
  return sorted(dims)


def _decoder(config, text_module, seed: int):
  """The generative head's decoder: the text tower's BERT, causal, with cross-attention from
  `decoder.cross_from` on (default: the second half of its layers) and the masked-LM head,
  initialised from the text checkpoint (the parts the checkpoint lacks are initialised
  fresh, from `seed`: the run's seed, as the rest of the model). It computes in model.dtype,
  as the other parts above the towers do (it took the text tower's dtype)."""
  cfg = config.model.text
  if not isinstance(text_module, BertEncoder):
    raise ValueError("the generative head's decoder is a BERT initialised from the text "
                     f"tower, but the text tower is a {type(text_module).__name__}; use "
                     "--config.model.head=classifier or a BERT text tower")
  dec = config.model.decoder
  depth = dec.get("depth") or text_module.depth
  cross_from = dec.get("cross_from")
  if cross_from is None:
    cross_from = depth // 2
  if not 0 <= cross_from < depth:
    raise ValueError(
        f"model.decoder.cross_from={cross_from} leaves the {depth}-layer decoder without a "
        "cross-attention layer, so its answers would not depend on the image or the "
        f"question: set it between 0 and {depth - 1} (or leave it unset: {depth // 2})")
  changes = dict(causal=True, cross_from=cross_from, context_width=config.model.fusion.width,
                 lm_head=True, pooler="none", proj_dim=None, depth=depth)
  dtype = jnp.dtype(config.model.dtype)
  if cfg.source == "init":
    return text_module.clone(**changes, dtype=dtype, parent=None), None
  from medvqa_jax.models import towers
  arch = {k: v for k, v in cfg.arch.items() if v is not None}
  arch.update(changes, compute=text_module.compute, dropout=text_module.dropout)
  # The checkpoint keys the text tower leaves unused (`unused`) are the decoder's to leave too.
  module, params = towers.load("text", cfg.source, cfg.checkpoint, dtype=dtype,
                               unused=tuple(cfg.get("unused", ())), seed=seed, **arch)
  return module, params


def initializer(config, seed: int = 0):
  """(model, init, loaded) for `config.model`: `loaded` holds the parameters read from
  checkpoints (the towers that have one, and the generative head's decoder from the text
  checkpoint), and `init(loaded)` is a pure function returning the whole model's parameters,
  freshly initialised except for `loaded`. Jit it with out_shardings to create the params
  already sharded: XLA drops the initialisation of the parts that `loaded` replaces."""
  from medvqa_jax.models import towers
  mc = config.model
  if mc.head not in HEADS:  # Named by its flag, before any checkpoint is read.
    raise ValueError(f"--config.model.head={mc.head!r}: unknown head; expected "
                     f"{', '.join(HEADS[:-1])} or {HEADS[-1]}")
  temperature_init = config.get("losses", {}).get("temperature_init", 0.07)
  if not temperature_init > 0:  # Learned as its log: -inf or NaN, a NaN loss at step 1.
    raise ValueError(f"--config.losses.temperature_init={temperature_init}: the contrastive "
                     "losses' temperatures start there and stay positive; give a value "
                     "above 0 (CLIP's is 0.07)")
  compute = compute_of(config)
  with state_dict.shared_reads():  # The towers and the decoder may share one checkpoint.
    image, image_params = towers.from_config(mc.image, seed=seed, abstract=True,
                                             compute=compute, where="model.image")
    text, text_params = towers.from_config(mc.text, seed=seed + 1, abstract=True,
                                           compute=compute, where="model.text")
    if isinstance(text, BertEncoder):  # BERT's hidden dropout, in training only.
      text = text.clone(dropout=mc.get("dropout", 0.0))
    decoder = decoder_params = None
    if mc.head == "generative":
      decoder, decoder_params = _decoder(config, text, seed)
  model = AMiF(image=image, text=text, decoder=decoder, width=mc.fusion.width,
               fusion_layers=mc.fusion.layers, num_heads=mc.fusion.heads,
               mlp_dim=mc.fusion.mlp_dim, head=mc.head, num_answers=mc.get("num_answers") or 0,
               temperature_init=temperature_init,
               dtype=jnp.dtype(mc.dtype), compute=compute, dropout=mc.get("dropout", 0.0))
  loaded = {name: tree for name, tree in
            (("image", image_params), ("text", text_params), ("decoder", decoder_params))
            if tree is not None}
  method = AMiF.pretrain if model.head == "none" else AMiF.vqa
  inputs = dummy_inputs(model, config)
  if model.head == "none":
    inputs["fuse"] = model.fusion_layers > 0  # Towers only: no fusion parameters.

  def init(loaded):
    params = dict(model.init(jax.random.PRNGKey(seed), **inputs, method=method)["params"])
    for name, tree in loaded.items():
      expected = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), params[name])
      got = jax.tree.map(lambda x: (x.shape, jnp.dtype(x.dtype)), tree)
      if expected != got:
        raise ValueError(f"loaded {name} parameters do not fit the model: {got} vs {expected}")
      params[name] = tree
    return params

  return model, init, loaded


def unused_params(params) -> dict[str, int]:
  """{path: parameter count} of the parameters no output of the model depends on: the
  towers' own projection heads (`head`, made where a tower's `proj_dim` is set: a CLIP
  checkpoint's projection, a preset's for its teacher role). The model projects the towers'
  pooled features with its own `image_proj` and `text_proj` (DESIGN.md), so these get zero
  gradients; they are kept so that a checkpoint tower loads whole."""
  return {f"{part}/head": param_count(params[part]["head"])
          for part in ("image", "text") if "head" in params.get(part, {})}


def param_count(tree) -> int:
  """The number of parameters in a tree of arrays (or of their shapes)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def create(config, seed: int = 0, abstract: bool = False):
  """(model, params) for `config.model`: towers loaded from their checkpoints (or initialised
  from `arch`), the decoder from the text checkpoint, everything else freshly initialised.
  With `abstract`, params are ShapeDtypeStructs."""
  model, init, loaded = initializer(config, seed)
  if abstract:
    return model, jax.eval_shape(init, loaded)
  return model, jax.jit(init)(loaded)


# Set from the config, not the checkpoint.
_NOT_ARCH = ("parent", "name", "dtype", "compute", "dropout")


def tower_settings(module: nn.Module) -> dict:
  """A tower's module fields (JSON-serialisable) but those set from the config (`_NOT_ARCH`:
  the compute dtype, the attention kernel, dropout), which change its outputs by rounding at
  most."""
  return {f.name: getattr(module, f.name) for f in dataclasses.fields(module)
          if f.name not in _NOT_ARCH}


def tower_archs(model: AMiF) -> dict:
  """The towers' settings (`tower_settings`): what a tower read from a checkpoint took from
  that checkpoint's config and weights. A run records them so that restoring it needs no
  tower checkpoint (see `without_checkpoints`)."""
  return {part: tower_settings(module)
          for part, module in (("image", model.image), ("text", model.text))}


def without_checkpoints(config, archs: dict):
  """A copy of `config` whose checkpoint towers are built from `archs` (recorded by
  `tower_archs`) instead of read from their checkpoints: the same model and parameter
  shapes, for restoring saved parameters over them. Checkpoint folders stay named (a text
  tower's tokenizer may live there)."""
  import ml_collections
  config = ml_collections.ConfigDict(config.to_dict())
  for part, arch in archs.items():
    cfg = config.model[part]
    if cfg.source != "init":
      cfg.source = "init"
      cfg.arch = ml_collections.ConfigDict(dict(arch))
  return config
