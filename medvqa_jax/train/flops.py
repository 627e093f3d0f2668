"""Analytic model FLOPs of a train step: the matrix multiplications the model needs (2 FLOPs
per multiply-add), forward 1x, backward 2x, for one example.

This is the count MFU is quoted against: rematerialisation's recomputation is not counted,
and elementwise work (LayerNorm, softmax, GELU, Sinkhorn's iterations) is left out. Each
layer (of a tower, the fusion, the decoder) and each other part is trained or frozen on its
own (learning-rate multiplier 0 on all its parameters, optim.lr_mults): trained, it costs 3x;
frozen, its forward pass only (1x) where nothing before it trains (frozen towers; a frozen
decoder's layers below its first cross-attention, which read the answer tokens alone), and
the backward pass to its inputs too (2x) where something before it trains (a frozen
decoder's cross-attention layers, a frozen fusion between trained towers).
Batch-independent work (the GCA's answer prior) is divided by the batch size (by the batch
of each device, which computes it for its share, for a count comparable with XLA's of one
device's program: `shared_by`). Token counts
are the padded ones the step computes on (text.max_len, answer_max_len, prior_max_tokens),
causal attention counted in full; the LM head's vocabulary logits at the answer_max_len - 1
positions that predict a token.
"""

from __future__ import annotations

import re

from medvqa_jax.models.bert import BertEncoder
from medvqa_jax.models.clip_text import ClipTextTransformer
from medvqa_jax.models.state_dict import flatten
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
  return sum(tower_segments(module, length))


def image_tokens(model) -> int:
  grid = model.image.image_size // model.image.patch_size
  return grid * grid + 1


def _layer_index(path: str) -> int | None:
  """The layer a parameter path inside a tower or a stack belongs to ("block_3/...",
  "layer_3/..." -> 3), None for one outside its layers."""
  m = re.match(r"(?:block|layer)_(\d+)/", path)
  return int(m.group(1)) if m else None


# A tower's parameters after its layers (final norm, pooler, projection head; no FLOPs
# counted): the rest outside its layers are its input's (patch or token embeddings).
_TOWER_OUTPUT = ("ln_final", "head", "pooler", "lm_")


class _Step:
  """The rows of a step's count, in forward order: each part's forward FLOPs and its factor.
  A part with a trained parameter costs 3x (forward, its weights' gradient, its input's:
  the usual 6N count); a frozen one 2x where something before it trains (the gradient passes
  through to it) and 1x otherwise; products of two activations (similarities, the OT cost),
  which have no weights, 3x where something before them trains."""

  def __init__(self, frozen: dict):
    self.frozen = frozen  # path -> True where the learning-rate multiplier is 0
    self.rows = []  # (name, forward FLOPs, factor)

  def trained(self, *prefixes: str) -> bool:
    return any(not f for path, f in self.frozen.items() if path.startswith(prefixes))

  def add(self, name: str, flops, trained: bool, before: bool, products: bool = False) -> bool:
    """Adds a row; returns whether a gradient reaches past it (for the rows after it)."""
    factor = (3 if before else 1) if products else 3 if trained else 2 if before else 1
    self.rows.append((name, flops, factor))
    return trained or before

  def tower(self, part: str, module, length: int | None = None, copies: int = 1) -> bool:
    """Adds a tower's rows (its input, then each layer, trained or frozen on its own, `copies`
    times: the views); returns whether any of its parameters trains."""
    segments = tower_segments(module, length)
    trained = [False] * len(segments)
    output = False
    for path, f in self.frozen.items():
      if f or not path.startswith(part + "/"):
        continue
      rest = path[len(part) + 1:]
      i = _layer_index(rest)
      if i is not None:
        trained[i + 1] = True
      elif rest.startswith(_TOWER_OUTPUT):
        output = True
      else:
        trained[0] = True
    before = False
    for flops, t in zip(segments, trained):
      before = self.add(part, copies * flops, t, before)
    return before or output

  def total(self) -> int:
    return sum(flops * factor for _, flops, factor in self.rows)

  def forward(self) -> dict:
    out = {}
    for name, flops, _ in self.rows:
      out[name] = out.get(name, 0) + flops
    return out

  def frozen_parts(self) -> list[str]:
    """The parts with a row that does not train its weights (all of it, or some layers)."""
    return sorted({name for name, _, factor in self.rows if factor < 3})


def tower_segments(module, length: int | None = None) -> list:
  """A tower's forward FLOPs on one example, in forward order: its input (the patch
  embedding; a text tower's embeddings, which are look-ups), then each layer."""
  if isinstance(module, VisionTransformer):
    grid = module.image_size // module.patch_size
    tokens = grid * grid + 1
    patch = 2 * (grid * grid) * module.patch_size ** 2 * 3 * module.width
    return [patch] + [layer(tokens, module.width, module.mlp_dim)] * module.depth
  if isinstance(module, (ClipTextTransformer, BertEncoder)):
    return [0] + [layer(length, module.width, module.mlp_dim)] * module.depth
  raise TypeError(f"no FLOP count for {type(module).__name__}")


def train_step(model, config, batch_size: int, params_shapes, teacher_dim: int = 512,
               shared_by: int | None = None) -> dict:
  """{"total": FLOPs per example of one train step, "forward": each part's forward FLOPs,
  "frozen": the parts with layers that do not train} for `model` (amif.AMiF) under `config`
  (its objective: fine-tuning or pre-training), at a global batch of `batch_size`.
  teacher_dim: width of the teacher's embeddings. shared_by: the examples one computation of
  the batch-independent work serves (default `batch_size`: the model's FLOPs; the batch per
  device, where every device computes it, for XLA's count of one device's program). Each
  tower layer, fusion layer and decoder layer is trained or frozen on its own
  (optim.lr_mults), as the step's gradient mask makes them."""
  mc = config.model
  d, m = model.width, model.mlp_dim
  lt, li = mc.text.max_len, image_tokens(model)
  wi, wt = model.image.width, model.text.width
  step = _Step(flatten(optim.frozen_mask(config.optim, params_shapes)))
  trained = step.trained

  def fusion(before: bool, pairs: int = 1) -> bool:
    for i in range(model.fusion_layers):
      before = step.add("fusion", pairs * (layer(lt, d, m, li) + layer(li, d, m, lt)),
                        trained(f"fusion/text_layer_{i}/", f"fusion/image_layer_{i}/"), before)
    return before

  if model.head == "none":
    weights = dict(config.losses.weights)
    on = lambda k: weights.get(k, 0) > 0
    views = 2 if on("imvc") else 1
    fused = on("wpa") or on("itm")
    image = step.tower("image", model.image, copies=views)
    text = step.tower("text", model.text, lt)
    # Projections of the pooled features, and of every token when they are fused; the ITM
    # negatives' tokens are taken from the towers' outputs and projected again.
    negative_images = on("itm") and config.losses.itm.negative_images
    image = step.add("projections", views * 2 * wi * d + (2 * li * wi * d if fused else 0)
                     + (2 * li * wi * d if negative_images else 0),
                     trained("image_proj/"), image)
    text = step.add("projections", 2 * wt * d + (2 * lt * wt * d if fused else 0)
                    + (2 * lt * wt * d if on("itm") else 0), trained("text_proj/"), text)
    teacher = config.teacher.mode != "none"
    # Similarity matrices of the global batch: image-text, the two views, and (with a
    # teacher) text-text; the teacher's own matrices are forward only.
    sims = 1 + (views == 2) + teacher
    step.add("losses", sims * 2 * batch_size * d, False, image or text, products=True)
    if teacher:
      step.add("teacher_similarities", sims * 2 * batch_size * teacher_dim, False, False,
               products=True)
    if fused:
      pairs = 1 + (on("itm") + negative_images)
      fused_before = fusion(image or text or trained("type_embed/"), pairs)
      if on("wpa"):
        step.add("ot_cost", 2 * lt * li * d, False, fused_before, products=True)
  else:
    image = step.add("projections", 2 * li * wi * d, trained("image_proj/"),
                     step.tower("image", model.image))
    text = step.add("projections", 2 * lt * wt * d, trained("text_proj/"),
                    step.tower("text", model.text, lt))
    before = fusion(image or text or trained("type_embed/"))
    p, lx = mc.prior_max_tokens, lt + li
    # Once per batch: the prior's projection, its layer, and its keys/values for the cross-
    # attention. Per example: that attention's query/out projections and its two products,
    # the gate and the MLP.
    prior = layer(p, d, m) + (2 * p * wt * d if wt != d else 0) + 2 * p * 2 * d * d
    gca = (prior / (shared_by or batch_size) + 2 * lx * 2 * d * d + 2 * 2 * lx * p * d
           + 2 * lx * d * d + 2 * 2 * lx * d * m)
    before = step.add("gca", gca, trained("gca/"), before)
    if model.head == "classifier":
      step.add("head", 2 * 2 * d * d + 2 * 2 * d * 2 * d + 2 * 2 * d * mc.num_answers,
               trained("classifier/"), before)
    else:
      dec, la = model.decoder, mc.answer_max_len
      cross_from = dec.depth if dec.cross_from is None else dec.cross_from
      # The layers below the cross-attention read the answer tokens alone (after the
      # decoder's embeddings); from the first cross-attention on, the loss's gradient also
      # passes to the GCA and the fusion. The LM head is tied to the word embeddings.
      below = trained(*(f"decoder/{k}/" for k in ("word_embed", "pos_embed", "type_embed",
                                                 "embed_ln")))
      for i in range(dec.depth):
        cross = i >= cross_from
        row = layer(la, dec.width, dec.mlp_dim, lx if cross else 0, d)
        below = step.add("head_cross" if cross else "head", row, trained(f"decoder/layer_{i}/"),
                         below or (before and cross))
      step.add("head_cross", 2 * la * dec.width * dec.width
               + 2 * (la - 1) * dec.width * dec.vocab_size,
               trained("decoder/lm_", "decoder/word_embed/"), below or before)
  return {"total": step.total(), "forward": step.forward(), "frozen": step.frozen_parts()}
