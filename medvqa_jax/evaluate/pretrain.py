"""Validation of a pre-training run: the objective's terms on the held-out slice of the
corpus, and image<->text retrieval among its examples.

The slice is cut into full global batches (the contrastive terms depend on the batch, so it
is the training batch size, and the examples beyond the last full batch are left out), its
views are augmented as in training but with a fixed draw per example, and the ITM negatives
are sampled with a fixed key: every validation of a run sees the same inputs, so the values
are comparable across steps. The checkpoint kept as best is the one of lowest `val_loss`.
"""

from __future__ import annotations

import jax
import numpy as np

from medvqa_jax.data import pipeline, splits as splits_lib
from medvqa_jax.losses.pretrain import pretrain_terms
from medvqa_jax.train import determinism, sharding

RECALL_AT = (1, 5, 10)


def retrieval(image: np.ndarray, text: np.ndarray, groups=None,
              ks=RECALL_AT) -> dict[str, float]:
  """Recall@k of image->text (i2t) and text->image (t2i) retrieval: row i of `image` and of
  `text` embed the same example, and examples of one group (`groups`, e.g. their image ids:
  other captions of the same picture) answer each other's queries. A query scores a hit at k
  as often as its best answer would rank within the first k if its ties with wrong candidates
  were broken at random: a collapsed model (every score equal) gets chance recall, k / N,
  not 1."""
  scores = np.asarray(image, np.float64) @ np.asarray(text, np.float64).T
  groups = np.arange(len(scores)) if groups is None else np.asarray(groups)
  same = groups[:, None] == groups[None, :]
  out = {}
  for direction, s in (("i2t", scores), ("t2i", scores.T)):
    best = np.where(same, s, -np.inf).max(1, keepdims=True)
    above = (~same & (s > best)).sum(1)
    tied = (~same & (s == best)).sum(1)
    for k in ks:
      out[f"{direction}_r{k}"] = float(np.mean(np.clip((k - above) / (tied + 1), 0, 1)))
  return out


def examples(config, split: splits_lib.Split) -> int:
  """The held-out examples validation uses: its whole global batches (refused if none)."""
  batch = config.train.batch_size
  n = len(split.records) // batch * batch
  if not n:
    raise ValueError(
        f"validation needs at least one batch of {batch} examples, and the held-out slice of "
        f"{config.data.name} has {len(split.records)}: raise --config.data.val_fraction, or "
        "set it to 0 to pre-train without validation")
  return n


class Validator:
  """`validator(params, step)` -> {"val_loss", "val_<term>", ..., "val_i2t_r1", ...}."""

  def __init__(self, model, config, split: splits_lib.Split, tokenizer, image_size: int, mesh,
               teacher=None, stream=None):
    tc = config.train
    if tc.batch_size % mesh.size:
      raise ValueError(f"validation runs in batches of train.batch_size ({tc.batch_size}), "
                       f"which must be divisible by the device count ({mesh.size})")
    self.examples = examples(config, split)
    # The held-out slice in order (validation does not shuffle): its rows' pictures.
    self.groups = [r["image_id"] for r in split.records[:self.examples]]
    self.ds = pipeline.batches(
        splits_lib.Subset(split.source, range(self.examples)), kind="caption",
        tokenizer=tokenizer, image_size=image_size, global_batch=tc.batch_size,
        seed=config.seed, augmentation="pretrain", process_index=jax.process_index(),
        process_count=jax.process_count(), shuffle=False, repeat=False,
        teacher=teacher.pipeline_option() if teacher else None)
    self.mesh, self.teacher, self.workers = mesh, teacher, config.data.workers
    self.stream, self.main = stream, jax.process_index() == 0
    self.key = jax.random.PRNGKey(config.seed)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def evaluate(params, batch, key):
      _, metrics, out = pretrain_terms(model, sharding.gathered(params, mesh), batch, key,
                                       config.losses, train=False)
      return metrics, out["image_embed"], out["text_embed"]
    # Replicated outputs: every host gets the whole batch's embeddings for the retrieval.
    self._evaluate = jax.jit(evaluate, out_shardings=replicated,
                             compiler_options=determinism.compiler_options(config, mesh))

  def __call__(self, params, step: int) -> dict:
    from medvqa_jax.train import observe
    report = observe.progress(f"validation at step {step}", self.main, self.stream)
    sums, images, texts = {}, [], []
    batches = len(self.ds)
    with pipeline.iterate(self.ds, num_workers=self.workers) as it:
      for i, host in enumerate(it):
        ids = host.pop("id")
        if self.teacher is not None:
          host.update(self.teacher.host_fields(ids))
        batch = sharding.shard_batch(self.mesh, host)
        if self.teacher is not None:
          batch = self.teacher.device_fields(batch)
        metrics, image, text = jax.device_get(
            self._evaluate(params, batch, jax.random.fold_in(self.key, i)))
        for k, v in metrics.items():
          sums[k] = sums.get(k, 0.0) + float(v)
        images.append(image)
        texts.append(text)
        report((i + 1) * len(ids) * jax.process_count(), self.examples)
    # The temperatures are parameters, not figures of the held-out data: left to training's.
    out = {f"val_{k}": v / batches for k, v in sums.items() if not k.startswith("temperature_")}
    recall = retrieval(np.concatenate(images), np.concatenate(texts), self.groups)
    out.update({f"val_{k}": v for k, v in recall.items()})
    out["val_examples"] = self.examples
    return out
