"""Answering a split with a model: batches padded to a fixed global size (one compiled
shape, any device count), predictions gathered on every host, accuracy and the files.

The answer of the classifier head is its argmax over the answer vocabulary, scored by its
softmax probability; the generative head ranks the candidate answers (top-k by first-token
probability, re-scored by full likelihood, or by model.rank_score's other score) and scores
the best by its sequence probability.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from medvqa_jax import files as files_lib
from medvqa_jax.data import answers as answers_lib
from medvqa_jax.data import pipeline
from medvqa_jax.evaluate import metrics as metrics_lib
from medvqa_jax.models import amif, gca, heads
from medvqa_jax.models.amif import AMiF
from medvqa_jax.train import determinism, sharding

log = logging.getLogger(__name__)

INPUTS = ("images", "input_ids", "attention_mask")


class Predictor:
  """Jitted answering for a model, its answer set and a mesh."""

  def __init__(self, model: AMiF, config, answers: list[str], tokenizer, mesh, param_shardings,
               prior_answers: list[str] | None = None):
    """answers: the candidates; prior_answers: the answers of the GCA prior, the model's
    input (default: the candidates; the run's own when only the candidates change, as
    eval.py --closed_set does for a run trained under the open-set protocol)."""
    self.model, self.answers, self.mesh = model, list(answers), mesh
    self.tokenizer = tokenizer
    mc = config.model
    prior = list(prior_answers) if prior_answers is not None else self.answers
    self.prior_ids, self.prior_mask = (jnp.asarray(x) for x in gca.answer_prior(
        prior, tokenizer.hf, mc.prior_max_tokens))
    cand = tokenizer(self.answers, max_len=mc.answer_max_len)
    cut = (answers_lib.longer_than(self.answers, tokenizer.hf, mc.answer_max_len)
           if model.head == "generative" else [])
    if cut:
      log.warning("%d of the %d answers are longer than model.answer_max_len=%d word pieces "
                  "([CLS] and [SEP] included) and are cut, so that they cannot be told from "
                  "others that begin alike (e.g. %r)", len(cut), len(self.answers),
                  mc.answer_max_len, cut[0])
    self.cand_ids, self.cand_mask = jnp.asarray(cand["input_ids"]), jnp.asarray(cand["attention_mask"])
    replicated = NamedSharding(mesh, P())
    self.k, self.pack = mc.rank_k, 0
    # (A run's config from before model.rank_score ranked by likelihood.)
    self.score = amif.check_rank_score(mc.get("rank_score", "likelihood"))
    # The answers the model can give: all of a classifier's; of the generative head's, those
    # not tokenized like an earlier one (ranked above them whatever the model learns).
    shadowed = ({a for a, _ in tokenized_alike(self.answers, cand["input_ids"])}
                if model.head == "generative" else set())
    self.predictable = [a for a in self.answers if a not in shadowed]
    if model.head == "generative":
      self.k = rank_k(mc.rank_k, self.answers, cand["input_ids"])
      # Each question's k candidates decoded as one packed row where that saves tokens.
      self.pack = heads.pack_length(cand["attention_mask"], self.k)
    k = self.k

    def predict(params, images, input_ids, attention_mask, prior_ids, prior_mask, cand_ids,
                cand_mask):
      variables = {"params": sharding.gathered(params, mesh)}
      if model.head == "classifier":
        out = model.apply(variables, images, input_ids, attention_mask, prior_ids, prior_mask,
                          method=AMiF.vqa)
        return out["prediction"], jnp.max(jax.nn.log_softmax(out["logits"], axis=-1), axis=-1)
      out = model.apply(variables, images, input_ids, attention_mask, prior_ids, prior_mask,
                        cand_ids, cand_mask, k=k, pack=self.pack, score=self.score,
                        method=AMiF.rank)
      best = jnp.argmax(out["ranking"], axis=-1)[:, None]
      return out["prediction"], jnp.take_along_axis(out["scores"], best, axis=-1)[:, 0]

    self._predict = jax.jit(predict, in_shardings=(param_shardings,) + (None,) * 7,
                            out_shardings=(replicated, replicated),
                            compiler_options=determinism.compiler_options(config, mesh))
    # The prior and the candidates, on the devices once: they were put there every batch.
    self._consts = [jax.device_put(x, replicated) for x in
                    (self.prior_ids, self.prior_mask, self.cand_ids, self.cand_mask)]

  def __call__(self, params, batch: dict):
    """Answer indices and the log-probabilities of those answers (`probability` makes them
    scores) of a global batch (arrays on the mesh), as arrays on the devices, perhaps not yet
    computed: `jax.device_get` waits for them."""
    return self._predict(params, *(batch[k] for k in INPUTS), *self._consts)


def probability(log_prob) -> float:
  """A probability from its float32 log: exponentiated in float64, where a long answer's
  sequence probability (below 1e-45 from a log-likelihood under -103) is not rounded to 0."""
  return float(np.exp(np.float64(log_prob)))


def ranked_answers(ranked: dict, answers: list[str], top: int) -> list[list[tuple[str, float]]]:
  """Per question, the generative head's re-scored candidates (`AMiF.rank`'s topk, scores and
  ranking) in the order the ranking ranks them, best first (ties: as argmax picks), each with
  its sequence probability: the first `top` of them. Under model.rank_score
  "first_token_twice" that order is not the probabilities' (a likelier answer can come
  second)."""
  idx, scores, ranking = (np.asarray(ranked[k]) for k in ("topk", "scores", "ranking"))
  return [[(answers[idx[q, j]], probability(scores[q, j]))
           for j in np.argsort(-ranking[q], kind="stable")[:top]] for q in range(len(idx))]


def rank_k(k: int, answers: list[str], cand_ids) -> int:
  """The candidates the generative head re-scores: model.rank_k, or more where more than k
  candidates begin with the same word piece. They tie on the first pass (the probability of
  their first piece), and top-k keeps the first k of a tie, so the rest of such a group could
  never be predicted (5 of VQA-RAD's 37 answers beginning with "right"). Raised so, k holds
  the whole group when its piece is the most probable; a group that straddles the k-th place
  is still cut there (its later answers are not re-scored for that question), as in the
  reference's top-k. Candidates that tokenize alike (the tokenizer strips accents that answer
  normalisation keeps) are warned of: only the first can be predicted."""
  ids = np.asarray(cand_ids)
  alike = tokenized_alike(answers, ids)
  if alike:
    log.warning("%d answers tokenize like an earlier one, which is always ranked above them "
                "(e.g. %r like %r)", len(alike), *alike[0])
  pieces, counts = np.unique(ids[:, 1], return_counts=True)
  if counts.max() > k:
    log.info("model.rank_k=%d raised to %d: %d candidate answers begin with the same word "
             "piece (id %d), and the first pass cannot tell them apart", k, counts.max(),
             counts.max(), pieces[counts.argmax()])
  return max(k, int(counts.max()))


def tokenized_alike(answers: list[str], cand_ids) -> list[tuple[str, str]]:
  """(answer, the earlier answer whose token ids it has) for each candidate that tokenizes
  like an earlier one (the tokenizer strips accents that answer normalisation keeps, or maps
  both to its unknown piece)."""
  first: dict = {}  # Token ids -> the first answer with them.
  alike = []
  for row, answer in zip(np.asarray(cand_ids), answers):
    earlier = first.setdefault(row.tobytes(), answer)
    if earlier != answer:
      alike.append((answer, earlier))
  return alike


def eval_batches(source, *, tokenizer, image_size: int, global_batch: int,
                 process_index: int = 0, process_count: int = 1):
  """This host's parts of the global evaluation batches, in order: global
  batch b holds examples b*G .. b*G+G-1 (the last padded by repeating the final example) and
  host h its rows h*G/H .. (h+1)*G/H - 1, as `sharding.shard_batch` lays them out."""
  if global_batch % process_count:
    raise ValueError(f"eval batch {global_batch} is not divisible by {process_count} hosts")
  n, per = len(source), global_batch // process_count
  num = math.ceil(n / global_batch)
  index = [min(b * global_batch + process_index * per + j, n - 1)
           for b in range(num) for j in range(per)]
  fn = pipeline._Example("vqa", tokenizer, image_size, "test")
  # Threads make examples, not whole batches, two batches ahead: iterated whole, a map of
  # batches read up to 500 batches ahead (a test split of 6,719 questions held in memory,
  # 1.7 GB at 288 px) and its first batch came when 16 threads had each made one.
  ds = (grain.MapDataset.source(index).map(lambda i: fn(source[i]))
        .to_iter_dataset(grain.ReadOptions(num_threads=min(16, os.cpu_count() or 1),
                                           prefetch_buffer_size=2 * per))
        .batch(per))
  for batch in ds:
    yield {k: batch[k] for k in INPUTS}


def answer_split(predictor: Predictor, params, split, *, tokenizer, image_size: int,
                 global_batch: int, progress=None) -> list[dict]:
  """Prediction rows (qid, question, answer, prediction, score, correct) for a split.
  global_batch is rounded up to a multiple of the predictor's devices (the last batch is
  padded anyway)."""
  n = len(split.records)
  devices = predictor.mesh.size
  global_batch = -(-global_batch // devices) * devices
  idx, scores = [], []

  def fetch(answered):
    i, s = jax.device_get(answered)
    idx.append(np.asarray(i))
    scores.append(np.asarray(s))
    if progress:
      progress(min(len(idx) * global_batch, n), n)

  # One batch in flight: the next is made and sent while the devices answer this one (the
  # devices waited for each answer to be read, and for the next batch to be made, before).
  pending = None
  for batch in eval_batches(split.source, tokenizer=tokenizer, image_size=image_size,
                            global_batch=global_batch, process_index=jax.process_index(),
                            process_count=jax.process_count()):
    answered = predictor(params, sharding.shard_batch(predictor.mesh, batch))
    if pending is not None:
      fetch(pending)
    pending = answered
  if pending is not None:
    fetch(pending)
  idx, scores = np.concatenate(idx)[:n], np.concatenate(scores)[:n]
  rows = []
  for r, i, s in zip(split.records, idx, scores):
    pred = predictor.answers[int(i)]
    rows.append({"qid": r["id"], "question": r["question"], "answer": "#".join(r["answers"]),
                 "prediction": pred, "score": float(f"{probability(s):.6g}"),
                 "correct": answers_lib.is_correct(pred, r["answers"]),
                 "answer_type": r["answer_type"], "question_type": r["question_type"]})
  return rows


def evaluate(rows: list[dict], split, protocol: str, step: int, baseline: str | None = None,
             predictable: list[str] | None = None) -> dict:
  """metrics.json's content: accuracies, the protocol, the split, the step, the records of
  the split skipped as bad when it was built (`skipped_at_build`: the accuracies are over the
  others; `skipped_from`: the built split they are of, when the split is a part of it), the
  majority-answer baseline's accuracies when `baseline` (that answer) is given,
  and with `predictable` (the answers the model can give: `Predictor.predictable`) how many
  questions have a correct answer among them (`answerable`: the most that can be right;
  under the open-set protocol an answer first seen in test is not one)."""
  out = {"protocol": protocol, "split": split.name, "step": int(step),
         "skipped_at_build": int(split.skipped)}
  if split.skipped and split.part_of:
    out["skipped_from"] = split.part_of
  out.update(metrics_lib.vqa_accuracy(split.records, [r["prediction"] for r in rows]))
  if predictable is not None:
    can = set(predictable)
    out["answerable"] = sum(bool(can.intersection(answers_lib.alternatives(r["answers"])))
                            for r in split.records)
  if baseline is not None:
    base = metrics_lib.vqa_accuracy(split.records, [baseline] * len(split.records))
    out["majority_baseline"] = {"answer": baseline, "overall": base["overall"],
                                "open": base["open"], "closed": base["closed"],
                                "by_yes_no": base["by_yes_no"]}
    if "by_question_type" in base:  # VQA-Med's protocol is per category.
      out["majority_baseline"]["by_question_type"] = base["by_question_type"]
  return out


def skipped_note(metrics: dict) -> str | None:
  """A warning when records of the evaluated split were skipped as bad at build time."""
  n = metrics.get("skipped_at_build", 0)
  if not n:
    return None
  if metrics.get("skipped_from"):  # A part of a built split (a held-out slice).
    return (f"warning: {n} records of the {metrics['skipped_from']} split were skipped as bad "
            f"when the dataset was built (prepare_data.py's report names them): the "
            f"{metrics['split']} split's {metrics['questions']} questions are drawn from the "
            f"others, and compare with no result on the whole of it")
  return (f"warning: {n} records of the {metrics['split']} split were skipped as bad when the "
          f"dataset was built (prepare_data.py's report names them): these accuracies are "
          f"over the other {metrics['questions']}, and compare with no result on the whole "
          f"split")


def summary(metrics: dict) -> str:
  """`evaluate`'s metrics as the table train.py prints: the model's accuracies beside the
  majority baseline's, overall, by answer_type, by the yes/no rule and by question category
  (the dataset's own: VQA-Med-2019's protocol is per category)."""
  pct = lambda x: "  -  " if x is None else f"{100 * x:5.1f}"
  base = metrics.get("majority_baseline", {})
  lines = [f"test ({metrics['split']}, {metrics['questions']} questions, checkpoint step "
           f"{metrics['step']}; {metrics['protocol']}):",
           f"  {'':24}{'model':>7}{'majority':>10}"]
  for name, ours, theirs in (
      ("overall", metrics["overall"], base.get("overall")),
      ("open (answer_type)", metrics["open"], base.get("open")),
      ("closed (answer_type)", metrics["closed"], base.get("closed")),
      ("open (not yes/no)", metrics["by_yes_no"]["open"]["accuracy"],
       base.get("by_yes_no", {}).get("open", {}).get("accuracy")),
      ("closed (yes/no)", metrics["by_yes_no"]["closed"]["accuracy"],
       base.get("by_yes_no", {}).get("closed", {}).get("accuracy"))):
    lines.append(f"  {name:24}{pct(ours):>7}{pct(theirs):>10}")
  theirs = base.get("by_question_type", {})
  for category, ours in metrics.get("by_question_type", {}).items():  # The dataset's own.
    lines.append(f"  {category[:22] + ' *':24}{pct(ours['accuracy']):>7}"
                 f"{pct(theirs.get(category, {}).get('accuracy')):>10}")
  lines.append(f"  majority answer: {base.get('answer')!r}" +
               ("; * question type (category)" if metrics.get("by_question_type") else ""))
  n, can = metrics["questions"], metrics.get("answerable")
  if can is not None and can < n:
    lines.append(f"  note: {n - can} of the {n} questions have no correct answer among those "
                 f"the model can give: at most {100 * can / n:.1f}% can be right")
  note = skipped_note(metrics)
  return "\n".join(lines + ([note] if note else []))


def write(out_dir, metrics: dict, rows: list[dict] | None) -> Path:
  """metrics.json and (rows not None) predictions.jsonl (each row labelled with the
  protocol), each written to a temporary file and renamed, metrics.json last: it marks the
  evaluation complete. A failure leaves the old pair; a kill between the renames, no
  metrics.json (the old one stood beside new predictions). Call on one host only."""
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  files = {"metrics.json": json.dumps(metrics, indent=1) + "\n"}
  if rows is not None:
    files["predictions.jsonl"] = "".join(json.dumps({**r, "protocol": metrics["protocol"]})
                                         + "\n" for r in rows)
  tmps = {name: files_lib.temporary(out_dir / name) for name in files}
  done = out_dir / "metrics.json"
  previous = files_lib.temporary(out_dir / "metrics.json.previous")
  try:
    for name, text in files.items():
      tmps[name].write_text(text)
    if done.exists():  # Set aside: put back if the new pair fails before any of it is in.
      os.replace(done, previous)
    for name in sorted(files, key=lambda n: n == "metrics.json"):
      os.replace(tmps[name], out_dir / name)
  except BaseException:
    # Nothing of the new pair in place (every temporary file still there): the old one back.
    if previous.exists() and all(tmp.exists() for tmp in tmps.values()):
      os.replace(previous, done)
    raise
  finally:
    for tmp in (*tmps.values(), previous):
      tmp.unlink(missing_ok=True)
  return out_dir
