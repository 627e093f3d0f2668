"""The pre-training objective: global soft-label losses, OT word-patch alignment, ITM with
hard negatives, weighted by the config. Stage 0 sets the fusion losses' weights to zero
(fusion is then not run); stage 1 freezes the encoders through the optimizer."""

from __future__ import annotations

import jax

from medvqa_jax.data import device_augment
from medvqa_jax.losses import contrastive, itm, ot
from medvqa_jax.models.amif import AMiF


# The terms a weight in `config.losses.weights` can name (a new term is added here too).
TERMS = ("itgc", "imvc", "utgc", "wpa", "itm")


def teacher_embeddings(batch: dict) -> dict | None:
  """The teacher's normalised embeddings carried by a batch (from the cache, or computed
  online), or None when training without a teacher (hard-label ablation)."""
  if "teacher_image" not in batch:
    return None
  return {"image": batch["teacher_image"], "text": batch["teacher_text"],
          "image2": batch.get("teacher_image2", batch["teacher_image"]),
          "scale": batch["teacher_scale"]}


def pretrain_loss(model: AMiF, params, batch: dict, key, cfg):
  """Returns (total loss, metrics: every term, the temperatures, solver/ITM diagnostics)."""
  return pretrain_terms(model, params, batch, key, cfg)[:2]


def pretrain_terms(model: AMiF, params, batch: dict, key, cfg, train: bool = True):
  """Returns (total loss, metrics: every term, the temperatures, solver/ITM diagnostics, the
  model's outputs: the embeddings image_embed / text_embed and the token outputs).

  batch: images, input_ids, attention_mask, optional image_key (the pictures' keys: the ITM
    negatives leave out other captions of the same picture), optional images2, the views'
    blur sigmas blur / blur2 when the pipeline drew them (applied here, on device), and the
    teacher embeddings teacher_image / teacher_text (/ teacher_image2) with teacher_scale
    (see `teacher_embeddings`). cfg: the `losses` config. key: the step's random key (ITM
    negatives, dropout; None without either). train: dropout on (validation: off).
  """
  weights = dict(cfg.weights)
  fusion = weights.get("wpa", 0) > 0 or weights.get("itm", 0) > 0
  # The ITM negatives and dropout draw from keys of their own (split, not folded in: with
  # partitionable threefry, fold_in(key, 1) is split(key)[1], the negative images' key).
  k_itm, k_drop = jax.random.split(key) if key is not None else (None, None)
  pairs = None
  if weights.get("itm", 0) > 0:
    # Examples of one caption, or of one picture, are not each other's negatives.
    alike = [itm.caption_keys(batch["input_ids"], batch["attention_mask"])]
    if "image_key" in batch:
      alike.append(batch["image_key"])
    pairs = lambda out: itm.hard_negative_pairs(
        k_itm, out["image_embed"], out["text_embed"], out["temperature"]["itgc"],
        cfg.itm.negative_images, alike)
  # The second view is encoded only when its loss counts.
  images2 = (device_augment.views(batch, "images2", "blur2")
             if "images2" in batch and weights.get("imvc", 0) > 0 else None)
  out = model.apply({"params": params}, device_augment.views(batch), batch["input_ids"],
                    batch["attention_mask"], images2=images2, pairs=pairs,
                    fuse=fusion, method=AMiF.pretrain,
                    rngs={"dropout": k_drop} if train and key is not None else None)
  student = {"image": out["image_embed"], "text": out["text_embed"]}
  if "image2_embed" in out:
    student["image2"] = out["image2_embed"]
  # A term weighted 0 is neither counted nor reported (utgc and itgc were logged as if they
  # trained), nor computed: XLA drops what no output reads.
  terms = {k: v for k, v in contrastive.global_losses(
      student, teacher_embeddings(batch), out["temperature"], cfg.lam,
      cfg.label_smoothing).items() if weights.get(k, 0) > 0}
  metrics = {f"temperature_{k}": v for k, v in out["temperature"].items()}
  if weights.get("wpa", 0) > 0:
    terms["wpa"], m = ot.wpa_loss(out["fused_text"], out["fused_image"], out["text_mask"],
                                  **cfg.ot)
    metrics.update(m)
  if weights.get("itm", 0) > 0:
    terms["itm"], m = itm.itm_loss(out["itm_logits"], out["pair_itm_logits"],
                                   itm.negative_weights(alike, cfg.itm.negative_images))
    metrics.update(m)
  total = sum(weights.get(k, 0.0) * v for k, v in terms.items())
  metrics.update(terms)
  metrics["loss"] = total
  return total, metrics, out
