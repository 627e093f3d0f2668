"""Analytic model FLOPs of a train step: the matrix multiplications the model needs (2 FLOPs
per multiply-add), forward 1x, backward 2x, for one example.

This is the count MFU is quoted against: rematerialisation's recomputation is not counted,
frozen towers (learning-rate multiplier 0 on all their parameters; nothing below them needs
a gradient) cost their forward pass only, a frozen answer decoder its forward pass and, from
its first cross-attention layer on, the backward pass to its inputs (2x), and elementwise
work (LayerNorm, softmax, GELU, Sinkhorn's iterations) is left out. Batch-independent work
(the GCA's answer prior) is divided by the batch size. Token counts are the padded ones the
step computes on (text.max_len, answer_max_len, prior_max_tokens), causal attention counted
in full; the LM head's vocabulary logits at the answer_max_len - 1 positions that predict a
token.
"""

from __future__ import annotations

import jax

from medvqa_jax.models.bert import BertEncoder
from medvqa_jax.models.clip_text import ClipTextTransformer
from medvqa_jax.models.vit import VisionTransformer
from medvqa_jax.train import optim


def attention(lq: int, lk: int, width: int, kv_width: int | None = None) -> int:
  """Query/out projections on lq tokens, key/value projections on lk tokens of kv_width,
  and the two attention products."""
  kv_width = width if kv_width is None else kv_width
  return 2 * lq * 2 * width * width + 2 * lk * 2 * kv_width * width + 2 * 2 * lq * lk * width


def layer(length: int, width: int, mlp: int, cross: int = 0, cross_width: int | None = None):
  """A transformer layer: self-attention, optional cross-attention to `cross` tokens, MLP."""
  flops = attention(length, length, width) + 2 * 2 * length * width * mlp
  if cross:
    flops += attention(length, cross, width, cross_width)
  return flops


def tower(module, length: int | None = None) -> int:
  """Forward FLOPs of a tower on one example (`length` text tokens)."""
  if isinstance(module, VisionTransformer):
    grid = module.image_size // module.patch_size
    tokens = grid * grid + 1
    patch = 2 * (grid * grid) * module.patch_size ** 2 * 3 * module.width
    return patch + module.depth * layer(tokens, module.width, module.mlp_dim)
  if isinstance(module, (ClipTextTransformer, BertEncoder)):
    return module.depth * layer(length, module.width, module.mlp_dim)
  raise TypeError(f"no FLOP count for {type(module).__name__}")


def image_tokens(model) -> int:
  grid = model.image.image_size // model.image.patch_size
  return grid * grid + 1


THROUGH = "through"  # A frozen part that the gradient of a trained part before it crosses.


def train_step(model, config, batch_size: int, params_shapes, teacher_dim: int = 512) -> dict:
  """{"total": FLOPs per example of one train step, "forward": each part's forward FLOPs,
  "frozen": the parts without a backward pass} for `model` (amif.AMiF) under `config` (its
  objective: fine-tuning or pre-training). teacher_dim: width of the teacher's embeddings."""
  mc = config.model
  d, m = model.width, model.mlp_dim
  lt, li = mc.text.max_len, image_tokens(model)
  wi, wt = model.image.width, model.text.width
  fwd = {}  # part -> (forward FLOPs per example, trained?)
  frozen = optim.frozen_mask(config.optim, params_shapes)
  # A part is frozen when every parameter of it is.
  trained = lambda part: not (part in frozen and all(jax.tree.leaves(frozen[part])))
  fusion_pair = model.fusion_layers * (layer(lt, d, m, li) + layer(li, d, m, lt))
  if model.head == "none":
    weights = dict(config.losses.weights)
    on = lambda k: weights.get(k, 0) > 0
    views = 2 if on("imvc") else 1
    fused = on("wpa") or on("itm")
    fwd["image"] = (views * tower(model.image), trained("image"))
    fwd["text"] = (tower(model.text, lt), trained("text"))
    # Projections of the pooled features, and of every token when they are fused.
    proj = views * 2 * wi * d + 2 * wt * d + (2 * (li * wi + lt * wt) * d if fused else 0)
    if on("itm"):  # The negatives' tokens: taken from the towers' outputs, projected again.
      proj += 2 * lt * wt * d + (2 * li * wi * d if config.losses.itm.negative_images else 0)
    teacher = config.teacher.mode != "none"
    # Similarity matrices of the global batch: image-text, the two views, and (with a
    # teacher) text-text; the teacher's own matrices are forward only.
    sims = 1 + (views == 2) + teacher
    fwd["losses"] = (sims * 2 * batch_size * d, True)
    if teacher:
      fwd["teacher_similarities"] = (sims * 2 * batch_size * teacher_dim, False)
    fwd["projections"] = (proj, True)
    if fused:
      pairs = 1 + (on("itm") + (on("itm") and config.losses.itm.negative_images))
      fwd["fusion"] = (pairs * fusion_pair, True)
      if on("wpa"):
        fwd["ot_cost"] = (2 * lt * li * d, True)
  else:
    fwd["image"] = (tower(model.image), trained("image"))
    fwd["text"] = (tower(model.text, lt), trained("text"))
    fwd["projections"] = (2 * (li * wi + lt * wt) * d, True)
    fwd["fusion"] = (fusion_pair, True)
    p, lx = mc.prior_max_tokens, lt + li
    # Once per batch: the prior's projection, its layer, and its keys/values for the cross-
    # attention. Per example: that attention's query/out projections and its two products,
    # the gate and the MLP.
    prior = layer(p, d, m) + (2 * p * wt * d if wt != d else 0) + 2 * p * 2 * d * d
    gca = (prior / batch_size + 2 * lx * 2 * d * d + 2 * 2 * lx * p * d + 2 * lx * d * d
           + 2 * 2 * lx * d * m)
    fwd["gca"] = (gca, True)
    if model.head == "classifier":
      fwd["head"] = (2 * 2 * d * d + 2 * 2 * d * 2 * d + 2 * 2 * d * mc.num_answers, True)
    else:
      dec, la = model.decoder, mc.answer_max_len
      cross_from = dec.depth if dec.cross_from is None else dec.cross_from
      # The layers below the cross-attention read the answer tokens alone; from the first
      # cross-attention on, the loss's gradient passes through to the GCA and the fusion,
      # frozen decoder or not (backward 1x for the inputs' gradient, `THROUGH`).
      fwd["head"] = (cross_from * layer(la, dec.width, dec.mlp_dim), trained("decoder"))
      fwd["head_cross"] = ((dec.depth - cross_from) * layer(la, dec.width, dec.mlp_dim, lx, d)
                           + 2 * la * dec.width * dec.width
                           + 2 * (la - 1) * dec.width * dec.vocab_size,
                           True if trained("decoder") else THROUGH)
  factor = lambda t: 3 if t is True else 2 if t is THROUGH else 1
  total = sum(f * factor(t) for f, t in fwd.values())
  return {"total": total, "forward": {k: f for k, (f, _) in fwd.items()},
          "frozen": sorted(k for k, (_, t) in fwd.items() if t is not True)}
