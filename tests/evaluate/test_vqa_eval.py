"""Answering a split: the evaluation batches hold the split's examples in order (any host
count), predictions are matched to their own questions, and the protocol's answer set."""

import json
import logging
import os
import subprocess
import sys
import types
from pathlib import Path

import helpers
import jax
import numpy as np
import pytest
from ml_collections import ConfigDict
from PIL import Image

from medvqa_jax import ASSETS
from medvqa_jax.data import answers as answers_lib, augment, splits as splits_lib
from medvqa_jax.data.tokenizer import Tokenizer
from medvqa_jax.evaluate import run as run_lib
from medvqa_jax.evaluate import vqa
from medvqa_jax.models import amif, heads
from medvqa_jax.models.amif import AMiF
from medvqa_jax.train import checkpoint as ckpt_lib
from medvqa_jax.train import sharding

SIZE = 16
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """A built VQA-RAD (MEVF layout): 12 training questions over 6 images (one image, 2
  questions, held out for validation), 6 test questions over 3 other images, with distinct
  answers, four of them in no training answer. Every question is distinct, and already
  clean (lower case, no punctuation), so that the model reads it as stored."""
  src = tmp_path_factory.mktemp("src")
  (src / "images").mkdir()
  rng = np.random.default_rng(0)
  for i in range(9):
    Image.fromarray(rng.integers(0, 255, (30, 40, 3), np.uint8)).save(src / "images" / f"{i}.jpg")
  row = lambda qid, image, answer: dict(qid=qid, image_name=f"{image}.jpg",
                                        question=f"what is seen in region {qid}",
                                        answer=answer, answer_type="OPEN")
  train = [row(i, i // 2, ["Yes", "no", "The left lung"][i % 3]) for i in range(12)]
  test_answers = ["yes", "no", "Cardiomegaly.", "pleural effusion", "A mass", "fracture"]
  test = [row(100 + i, 6 + i // 2, a) for i, a in enumerate(test_answers)]
  (src / "trainset.json").write_text(json.dumps(train))
  (src / "testset.json").write_text(json.dumps(test))
  dc = ConfigDict(dict(name="vqa_rad", dir=str(tmp_path_factory.mktemp("tfds")),
                       source_dir=str(src), max_side=None, train_split="train", val_split="",
                       val_fraction=1 / 6, test_split="test", closed_set=False))
  return dc, splits_lib.vqa_splits(dc)


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=12)


def test_the_answer_set_has_test_answers_under_the_closed_set_protocol_only(data):
  dc, splits = data
  assert len(splits["train"].records) == 10 and len(splits["val"].records) == 2
  open_vocab, open_protocol = splits_lib.answer_set(dc, splits)
  assert open_protocol == splits_lib.OPEN_SET
  assert sorted(open_vocab) == ["left lung", "no", "yes"]  # Normalised train+val answers.
  closed = dc.copy_and_resolve_references()
  closed.closed_set = True
  closed_vocab, closed_protocol = splits_lib.answer_set(closed, splits)
  assert closed_protocol == splits_lib.CLOSED_SET
  assert sorted(closed_vocab) == ["cardiomegaly", "fracture", "left lung", "mass", "no",
                                  "pleural effusion", "yes"]
  # The test split is loaded when the splits given lack it.
  without_test = {k: splits[k] for k in ("train", "val")}
  assert splits_lib.answer_set(closed, without_test)[0] == closed_vocab
  assert splits_lib.answer_set(dc, without_test)[0] == open_vocab


def test_the_open_set_answers_hold_validation_answers_never_seen_in_training(data):
  """An answer that only a validation question has is in the open-set vocabulary (train +
  validation), so the model can give it; without it that question could never be right."""
  import dataclasses
  dc, splits = data
  val = splits["val"]
  records = [{**val.records[0], "answers": ["Pneumothorax"]}] + val.records[1:]
  changed = {**splits, "val": dataclasses.replace(val, records=records)}
  vocab, _ = splits_lib.answer_set(dc, changed)
  assert "pneumothorax" in vocab
  assert set(vocab) == {answers_lib.normalize(r["answers"][0])
                        for r in splits["train"].records + records}


def _host_batches(split, tokenizer, global_batch, hosts):
  """Per global batch, the hosts' parts concatenated in host order."""
  parts = [list(vqa.eval_batches(split.source, tokenizer=tokenizer, image_size=SIZE,
                                 global_batch=global_batch, process_index=h,
                                 process_count=hosts)) for h in range(hosts)]
  assert len({len(p) for p in parts}) == 1
  return [{k: np.concatenate([p[b][k] for p in parts]) for k in vqa.INPUTS}
          for b in range(len(parts[0]))]


@pytest.mark.parametrize("hosts", [1, 2])
def test_eval_batches_hold_the_examples_in_order_then_the_last_repeated(data, tokenizer, hosts):
  """10 examples in global batches of 4: examples 0..9, then the last twice, whatever the
  host count; each row's question tokens and pixels are its example's."""
  split = data[1]["train"]  # A held-out Subset: positions differ from the built ids.
  n = len(split.source)
  assert n == 10
  batches = _host_batches(split, tokenizer, 4, hosts)
  assert len(batches) == 3 and all(len(b["input_ids"]) == 4 for b in batches)
  order = list(range(n)) + [n - 1, n - 1]
  rows = {k: np.concatenate([b[k] for b in batches]) for k in vqa.INPUTS}
  for row, i in enumerate(order):
    ex = split.source[i]
    want = tokenizer([ex["question"].decode()])
    np.testing.assert_array_equal(rows["input_ids"][row], want["input_ids"][0], err_msg=str(row))
    np.testing.assert_array_equal(rows["attention_mask"][row], want["attention_mask"][0])
    np.testing.assert_array_equal(rows["images"][row], augment.resize(ex["image"], SIZE))
  # The records (and so the prediction rows) are in the same order as the source.
  assert [split.source[i]["question"].decode() for i in range(n)] == \
      [r["question"] for r in split.records]
  with pytest.raises(ValueError, match="not divisible by 3 hosts"):
    next(vqa.eval_batches(split.source, tokenizer=tokenizer, image_size=SIZE, global_batch=4,
                          process_count=3))


def test_eval_batches_are_made_a_few_ahead_not_the_whole_split(data, tokenizer):
  """Iterating the map of batches read up to 500 batches ahead: a test split of 6,719
  questions was held in memory whole (1.7 GB at 288 px), and the first batch waited for 16
  threads to make a batch each. Now two batches ahead, made example by example."""
  split = data[1]["train"]
  read = []

  class Counted:  # 80 batches of 8 over the split's 10 examples, counting the reads.
    def __len__(self):
      return 640

    def __getitem__(self, i):
      read.append(i)
      return split.source[i % len(split.source)]

  batches = vqa.eval_batches(Counted(), tokenizer=tokenizer, image_size=SIZE, global_batch=8)
  first = next(batches)
  assert [tokenizer([split.source[i]["question"].decode()])["input_ids"][0].tolist()
          for i in range(8)] == first["input_ids"].tolist()
  assert len(read) <= 8 * 3 + 16  # This batch, two more, and a read per thread in flight.
  batches.close()


class _OwnIndex:
  """A predictor that answers each row with the index of the example whose question it
  holds (read back from its tokens) and scores it with the float32 log-probability
  -30 (index + 1); its answers are the records' ids, so a row's prediction names the question
  it was made for."""

  def __init__(self, split, tokenizer):
    self.mesh = sharding.make_mesh()
    self.answers = [r["id"] for r in split.records]
    self.index = {tuple(tokenizer([r["question"]])["input_ids"][0]): i
                  for i, r in enumerate(split.records)}
    self.calls = []

  def __call__(self, params, batch):
    ids = np.asarray(batch["input_ids"])
    self.calls.append(len(ids))
    idx = np.array([self.index[tuple(row)] for row in ids])
    return idx, (-30.0 * (idx + 1)).astype(np.float32)


@pytest.mark.parametrize("name", ["train", "test"])
def test_answer_split_matches_predictions_to_their_own_questions(data, tokenizer, name):
  split = data[1][name]
  n = len(split.records)
  predictor, progress = _OwnIndex(split, tokenizer), []
  rows = vqa.answer_split(predictor, None, split, tokenizer=tokenizer, image_size=SIZE,
                          global_batch=4, progress=lambda done, total: progress.append(
                              (done, total)))
  assert predictor.calls == [4] * -(-n // 4)  # Whole global batches, the last padded.
  assert [r["qid"] for r in rows] == [r["id"] for r in split.records]
  for i, (row, rec) in enumerate(zip(rows, split.records)):
    assert row["prediction"] == rec["id"] and row["question"] == rec["question"]
    # The probability, from float32 logs: made in float64, where exp(-120) and beyond are not
    # rounded to 0 (float32 ends at 1e-45).
    assert row["score"] == pytest.approx(np.exp(-30.0 * (i + 1)), rel=1e-5) and row["score"] > 0
    assert row["answer"] == "#".join(rec["answers"]) and row["correct"] is False
  assert progress[-1] == (n, n) and [d for d, _ in progress] == \
      [min(4 * (b + 1), n) for b in range(len(progress))]


def test_ranked_answers_give_long_answers_a_probability_not_zero():
  """predict.py's list from AMiF.rank's float32 log-likelihoods: a long or unlikely answer's
  probability (below float32's 1e-45) is still a probability, in the ranking's order."""
  ranked = {"topk": np.array([[2, 0, 1]]), "ranking": np.array([[-1.0, -150.0, -400.0]]),
            "scores": np.array([[-1.0, -150.0, -400.0]], np.float32)}
  (listed,) = vqa.ranked_answers(ranked, ["a", "b", "c"], top=3)
  assert [a for a, _ in listed] == ["c", "a", "b"]
  np.testing.assert_allclose([p for _, p in listed], np.exp([-1.0, -150.0, -400.0]), rtol=1e-6)
  assert all(p > 0 for _, p in listed)
  # Ties in the ranking (candidates that tokenize alike score alike) come in the order argmax
  # picks, so the first listed is the evaluation's prediction.
  for ranking, want in (([-1.0, -1.0, -3.0], "abc"), ([-3.0, -1.0, -1.0], "bca"),
                        ([-1.0, -3.0, -1.0], "acb")):
    ranked = {"topk": np.array([[0, 1, 2]]), "ranking": np.array([ranking]),
              "scores": np.array([ranking], np.float32)}
    (listed,) = vqa.ranked_answers(ranked, ["a", "b", "c"], top=3)
    assert "".join(a for a, _ in listed) == want, ranking
    assert listed[0][0] == "abc"[int(np.argmax(ranking))]


def _answered_with(split, tokenizer, which: int):
  """(the answer indices, the rows) of `split` answered by a predictor that gives each
  question alternative `which` of its own reference, the answer set being those."""
  vocab = sorted({r["answers"][which] for r in split.records})
  own = np.array([vocab.index(r["answers"][which]) for r in split.records])
  by_index = _OwnIndex(split, tokenizer)

  def predictor(params, batch):
    idx, score = by_index(params, batch)
    return own[idx], score

  predictor.mesh, predictor.answers = by_index.mesh, vocab
  return own, vqa.answer_split(predictor, None, split, tokenizer=tokenizer, image_size=SIZE,
                               global_batch=4)


def test_answer_split_scores_correctness_against_the_rows_own_references(data, tokenizer):
  """With the references as the answer set, a predictor answering each question with its own
  reference is right on every row (a row matched to another's prediction would not be: the
  test answers are distinct)."""
  split = data[1]["test"]
  own, rows = _answered_with(split, tokenizer, 0)
  assert len(set(own)) == len(own)
  assert [r["prediction"] for r in rows] == [r["answers"][0] for r in split.records]
  assert all(r["correct"] for r in rows)


def test_a_rows_correctness_counts_every_alternative_of_its_reference(data, tokenizer):
  """A question with several accepted answers (VQA-Med-2019's "a#b") is right when the
  prediction is any of them: in predictions.jsonl's rows as in metrics.json's accuracy."""
  import dataclasses
  split = data[1]["test"]
  # Each record's own answer second, after one that no prediction is.
  records = [{**r, "answers": ["nothing predicted", *r["answers"]]} for r in split.records]
  split = dataclasses.replace(split, records=records)
  _, rows = _answered_with(split, tokenizer, 1)
  assert all(r["correct"] is True for r in rows)
  assert [r["answer"] for r in rows] == ["#".join(r["answers"]) for r in records]
  assert vqa.evaluate(rows, split, "open-set", 0)["overall"] == 1.0


def test_pack_length_is_the_k_longest_candidates_where_that_halves_the_tokens():
  mask = lambda lengths, la=16: (np.arange(la) < np.array(lengths)[:, None]).astype(np.int32)
  assert heads.pack_length(mask([3, 3, 4, 10]), 2) == 16  # 10 + 4, rounded up to 8.
  assert heads.pack_length(mask([3, 3, 4, 10]), 4) == 24  # 20 -> 24 <= 64 / 2.
  assert heads.pack_length(mask([3, 3, 4, 10]), 9) == 24  # k capped at the candidates.
  assert heads.pack_length(mask([16, 16, 3]), 2) == 0  # 32 tokens packed or not: rows.
  assert heads.pack_length(mask([9, 9, 3]), 2) == 0  # 24 > 32 / 2: rows.


def test_the_predictor_ranks_in_packed_rows_and_answers_as_unpacked_ranking_does(tokenizer):
  """Short candidates (here at most 8 of 16 word pieces) are ranked in one packed row per
  question (the decoder reads (B, pack) tokens in the compiled program, not (B k, 16)) with
  the answers and scores of k rows per question; model.rank_score picks by its score."""
  config = helpers.tiny_config()
  config.model.update(answer_max_len=16, rank_k=4)
  model, params = amif.create(config)
  answers = ["yes", "no", "left lung", "right lung", "cardiomegaly", "pleural effusion",
             "mass", "fracture", "no fracture", "kidney", "liver", "axial"]
  mesh = sharding.make_mesh()
  predictor = vqa.Predictor(model, config, answers, tokenizer, mesh,
                            sharding.param_shardings(mesh, params))
  lengths = [len(tokenizer.hf(a)["input_ids"]) for a in answers]
  assert max(lengths) <= 8
  # Candidates are read at the answer length, not the question's (the tokenizer's 12).
  assert predictor.cand_ids.shape == (len(answers), 16)
  assert predictor.pack == -(-sum(sorted(lengths)[-4:]) // 8) * 8
  rng = np.random.default_rng(0)
  questions = tokenizer(["is there a fracture", "what organ is shown", "where is the mass",
                         "is the heart enlarged"])
  size = model.image.image_size
  batch = {"images": rng.normal(size=(4, size, size, 3)).astype(np.float32),
           "input_ids": questions["input_ids"], "attention_mask": questions["attention_mask"]}
  idx, score = predictor(params, sharding.shard_batch(mesh, batch))
  consts = (predictor.prior_ids, predictor.prior_mask, predictor.cand_ids, predictor.cand_mask)
  ref = jax.jit(lambda p, *a: model.apply({"params": p}, *a, k=4, method=AMiF.rank))(
      params, *batch.values(), *consts)
  np.testing.assert_array_equal(idx, ref["prediction"])
  # The best's log-likelihood (answer_split makes the probability).
  np.testing.assert_allclose(score, np.max(ref["scores"], axis=-1), rtol=1e-4)
  program = predictor._predict.lower(params, *sharding.shard_batch(mesh, batch).values(),
                                     *consts).as_text()
  assert f"4x{predictor.pack}x{model.decoder.width}xf32" in program
  assert f"{4 * predictor.k}x16x{model.decoder.width}xf32" not in program
  # model.rank_score: the paper's code's score picks the answer; its sequence probability
  # is the score. Answers of two word pieces each, whose likelihoods are close: it picks
  # another answer than the likelihood for some question here.
  two_pieces = ["left lung", "right lung", "no fracture", "big mass", "right kidney",
                "left kidney", "upper lobe", "lower lobe", "chest wall", "both lungs"]
  assert {len(tokenizer.hf(a)["input_ids"]) for a in two_pieces} == {4}
  questions = tokenizer(["is there a fracture", "what organ is shown", "where is the mass",
                         "is the heart enlarged"] * 2)
  batch = {"images": np.random.default_rng(2).normal(size=(8, size, size, 3)).astype(np.float32),
           "input_ids": questions["input_ids"], "attention_mask": questions["attention_mask"]}
  picks, orders = {}, {}
  for rank_score in ("likelihood", "first_token_twice"):
    config.model.rank_score = rank_score
    ranker = vqa.Predictor(model, config, two_pieces, tokenizer, mesh,
                           sharding.param_shardings(mesh, params))
    picks[rank_score], score = ranker(params, sharding.shard_batch(mesh, batch))
    ref = jax.jit(lambda p, *a: model.apply({"params": p}, *a, k=4, score=rank_score,
                                            method=AMiF.rank))(
        params, *batch.values(), ranker.prior_ids, ranker.prior_mask, ranker.cand_ids,
        ranker.cand_mask)
    best = np.argmax(ref["ranking"], axis=-1)[:, None]
    np.testing.assert_array_equal(picks[rank_score], np.take_along_axis(
        np.asarray(ref["topk"]), best, axis=-1)[:, 0])
    np.testing.assert_allclose(score, np.take_along_axis(np.asarray(ref["scores"]), best,
                                                         axis=-1)[:, 0], rtol=1e-4)
    # predict.py's list: best first, as the score ranks them, each with its probability.
    listed = vqa.ranked_answers(ref, two_pieces, 3)
    ranking = [{two_pieces[i]: v for i, v in zip(ref["topk"][q], ref["ranking"][q])}
               for q in range(len(listed))]
    prob = [{two_pieces[i]: np.exp(v) for i, v in zip(ref["topk"][q], ref["scores"][q])}
            for q in range(len(listed))]
    for q, answered in enumerate(listed):
      assert [a for a, _ in answered] == sorted(ranking[q], key=ranking[q].get,
                                                reverse=True)[:3]
      assert answered[0][0] == two_pieces[picks[rank_score][q]]
      np.testing.assert_allclose([s for _, s in answered], [prob[q][a] for a, _ in answered],
                                 rtol=1e-6)
    orders[rank_score] = [[a for a, _ in answered] for answered in listed]
  assert np.any(picks["likelihood"] != picks["first_token_twice"])
  assert orders["likelihood"] != orders["first_token_twice"]


def test_every_answer_of_a_group_sharing_a_first_word_piece_can_be_predicted(tokenizer,
                                                                              caplog):
  """Candidates beginning with the same word piece tie on the ranking's first pass, and top-k
  keeps the first k of a tie: with more of them than model.rank_k, the rest could never be
  predicted, whatever the image (5 of VQA-RAD's 37 answers beginning with "right"). k is
  raised to the largest such group, and the predictor answers as ranking every candidate
  does. Answers that tokenize alike (the uncased tokenizer strips accents) are warned of."""
  config = helpers.tiny_config()
  config.model.update(answer_max_len=8, rank_k=3)
  model, params = amif.create(config)
  answers = ["yes", "no", "left lung", "left kidney", "left hip", "left arm", "left lobe",
             "right lung"]
  mesh = sharding.make_mesh()
  with caplog.at_level(logging.INFO):
    predictor = vqa.Predictor(model, config, answers, tokenizer, mesh,
                              sharding.param_shardings(mesh, params))
  assert predictor.k == 5 and "model.rank_k=3 raised to 5" in caplog.text
  assert "tokenize like" not in caplog.text and predictor.predictable == answers
  rng = np.random.default_rng(1)
  questions = tokenizer(["where is the mass", "which side", "what is abnormal", "where"] * 2)
  size = model.image.image_size
  batch = {"images": rng.normal(size=(8, size, size, 3)).astype(np.float32),
           "input_ids": questions["input_ids"], "attention_mask": questions["attention_mask"]}
  idx, _ = predictor(params, sharding.shard_batch(mesh, batch))
  consts = (predictor.prior_ids, predictor.prior_mask, predictor.cand_ids, predictor.cand_mask)
  every = jax.jit(lambda p, *a: model.apply({"params": p}, *a, k=len(answers),
                                            method=AMiF.rank))(params, *batch.values(), *consts)
  np.testing.assert_array_equal(idx, every["prediction"])
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    vqa.rank_k(3, ["cafe", "café"], tokenizer(["cafe", "café"], max_len=8)["input_ids"])
  assert "1 answers tokenize like an earlier one, which is always ranked above them (e.g. " \
      "'café' like 'cafe')" in caplog.text
  # The answers the model can give: not those ranked below an earlier one's twin; all of a
  # classifier's.
  alike = ["cafe", "café", "no"]
  assert vqa.Predictor(model, config, alike, tokenizer, mesh, sharding.param_shardings(
      mesh, params)).predictable == ["cafe", "no"]
  config.model.update(head="classifier", num_answers=3)
  model, params = amif.create(config)
  assert vqa.Predictor(model, config, alike, tokenizer, mesh, sharding.param_shardings(
      mesh, params)).predictable == alike


class _FirstAnswer(run_lib.Restored):
  """A restored run whose predictor answers every question with its first answer."""

  def predictor(self, candidates=None):
    def predict(params, batch):
      n = len(batch["input_ids"])
      return np.zeros(n, np.int32), np.ones(n, np.float32)
    predict.mesh = sharding.make_mesh()
    predict.answers = self.answers if candidates is None else candidates
    predict.predictable = predict.answers
    return predict


@pytest.mark.parametrize("run_protocol", [splits_lib.OPEN_SET, splits_lib.CLOSED_SET])
def test_evaluation_answers_under_the_run_protocol_unless_asked_otherwise(
    data, tokenizer, tmp_path, run_protocol):
  """The protocol, the answers and the output folder follow the run's record (and
  `closed_set` where given), not the data.closed_set of the config evaluation was given: an
  open-set run evaluated with a closed-set config was answered open-set and filed as
  closed-set, and a closed-set run evaluated with a stock config and closed_set=False answered
  closed-set into the open-set folder. A closed-set run asked for open-set is refused: its
  GCA prior holds the test answers (the open-set label was written over it)."""
  dc, splits = data
  protocols = {}
  for closed in (False, True):
    other = dc.copy_and_resolve_references()
    other.closed_set = closed
    protocols[closed] = splits_lib.answer_set(other, splits)
  run_closed = run_protocol == splits_lib.CLOSED_SET
  assert protocols[run_closed][1] == run_protocol
  for given in (False, True):  # What the config given at evaluation says.
    config = ConfigDict(dict(data=dc.copy_and_resolve_references(),
                             model=dict(head="generative"), train=dict(eval_batch_size=4)))
    config.data.closed_set = given
    workdir = tmp_path / f"{run_closed}-{given}"
    restored = _FirstAnswer(config, types.SimpleNamespace(image=types.SimpleNamespace(
        image_size=SIZE)), None, protocols[run_closed][0], run_protocol, 5, None, None,
        tokenizer, workdir)
    for asked in (None, False, True):
      closed = run_closed if asked is None else asked
      if run_closed and not closed:  # Its prior holds the test answers: never open-set.
        with pytest.raises(ValueError, match="trained under the closed-set protocol: its GCA "
                           "prior, an input of the model, holds the answers of every split"):
          run_lib.evaluate_split(restored, "test", closed_set=asked)
        continue
      m = run_lib.evaluate_split(restored, "test", closed_set=asked)
      # An open-set run's closed-set candidates keep its prior: not the paper's protocol,
      # under whose name it was filed.
      want = (splits_lib.CLOSED_CANDIDATES if closed and not run_closed
              else protocols[closed][1])
      assert m["protocol"] == want, (given, asked)
      folder = workdir / "eval" / f"test-step5{'-closed-set' if closed else ''}"
      rows = (folder / "predictions.jsonl").read_text().splitlines()
      assert {json.loads(r)["prediction"] for r in rows} == {protocols[closed][0][0]}
      assert json.loads((folder / "metrics.json").read_text())["protocol"] == m["protocol"]
      assert config.data.closed_set == given  # The config is left as it was.
    assert sorted(p.name for p in (workdir / "eval").iterdir()) == (
        ["test-step5-closed-set"] if run_closed else ["test-step5", "test-step5-closed-set"])
  # A classifier's answers are its output classes, fixed when it was trained: class i written
  # as the i-th answer of another protocol's list would mislabel every prediction.
  config = ConfigDict(dict(data=dc.copy_and_resolve_references(),
                           model=dict(head="classifier"), train=dict(eval_batch_size=4)))
  restored = _FirstAnswer(config, types.SimpleNamespace(image=types.SimpleNamespace(
      image_size=SIZE)), None, protocols[run_closed][0], run_protocol, 5, None, None,
      tokenizer, tmp_path / "classifier")
  with pytest.raises(ValueError, match="the classifier's answers are fixed when it is trained"):
    run_lib.evaluate_split(restored, "test", closed_set=not run_closed)
  m = run_lib.evaluate_split(restored, "test", closed_set=run_closed)  # Its own: answered.
  assert m["protocol"] == run_protocol


def test_results_re_scored_otherwise_are_filed_apart(data, tokenizer, tmp_path):
  """A generative run evaluated with model.rank_score="first_token_twice" (the paper's code's
  score) writes beside its likelihood-ranked results, not over them; a classifier ranks
  nothing, so the setting does not name its results."""
  dc, splits = data
  answers, protocol = splits_lib.answer_set(dc, splits)
  for head in ("generative", "classifier"):
    for score in ("likelihood", "first_token_twice"):
      config = ConfigDict(dict(data=dc.copy_and_resolve_references(), train=dict(
          eval_batch_size=4), model=dict(head=head, rank_score=score)))
      restored = _FirstAnswer(config, types.SimpleNamespace(image=types.SimpleNamespace(
          image_size=SIZE)), None, answers, protocol, 5, None, None, tokenizer,
          tmp_path / head)
      run_lib.evaluate_split(restored, "test")
  assert sorted(p.name for p in (tmp_path / "generative" / "eval").iterdir()) == [
      "test-step5", "test-step5-first-token-twice"]
  assert sorted(p.name for p in (tmp_path / "classifier" / "eval").iterdir()) == ["test-step5"]


def test_the_evaluation_batch_is_rounded_up_to_the_devices(data, tokenizer, monkeypatch):
  """An eval_batch_size that the device count does not divide (64 on 3 devices) crashed in
  the sharding; it is rounded up to a multiple (the last batch is padded anyway)."""
  split = data[1]["test"]
  predictor = _OwnIndex(split, tokenizer)
  predictor.mesh = types.SimpleNamespace(size=3)
  monkeypatch.setattr(sharding, "shard_batch", lambda mesh, batch: batch)
  rows = vqa.answer_split(predictor, None, split, tokenizer=tokenizer, image_size=SIZE,
                          global_batch=4)
  assert predictor.calls == [6]
  assert [r["prediction"] for r in rows] == [r["id"] for r in split.records]


def test_results_are_written_as_a_pair_or_not_at_all(tmp_path):
  """metrics.json is renamed into place last, after predictions.jsonl: a failure in between
  (here predictions.jsonl cannot be replaced) leaves the old metrics, not new metrics beside
  old predictions, and no temporary file."""
  (tmp_path / "metrics.json").write_text('{"overall": 0.1}\n')
  (tmp_path / "predictions.jsonl").mkdir()
  with pytest.raises(OSError):
    vqa.write(tmp_path, {"overall": 0.9, "protocol": "p"}, [{"qid": "1"}])
  assert json.loads((tmp_path / "metrics.json").read_text()) == {"overall": 0.1}
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "predictions.jsonl"]
  (tmp_path / "predictions.jsonl").rmdir()
  vqa.write(tmp_path, {"overall": 0.9, "protocol": "p"}, [{"qid": "1"}])
  assert json.loads((tmp_path / "metrics.json").read_text())["overall"] == 0.9
  assert json.loads((tmp_path / "predictions.jsonl").read_text())["protocol"] == "p"


def test_an_evaluation_reads_the_data_as_built_and_never_builds(data, tmp_path, caplog):
  """A run folder copied elsewhere: its recorded data.dir held no build there, and eval.py
  built the dataset from the recorded source into that old folder (or failed in a traceback
  where it could not write); a recorded source folder that is not here was a refusal that
  said "do not give a source folder", though none was given."""
  dc, _ = data
  moved = dc.copy_and_resolve_references()
  moved.dir = str(tmp_path / "old-place")
  with pytest.raises(FileNotFoundError, match=rf"dataset vqa_rad is not built in "
                     rf"{moved.dir} \(the run's data.dir, unless overridden\): pass "
                     r"--config.data.dir=FOLDER where it is built now"):
    run_lib.built_data(moved)
  assert not (tmp_path / "old-place").exists()
  gone = dc.copy_and_resolve_references()
  gone.source_dir = str(tmp_path / "not-here")
  with caplog.at_level("WARNING"):
    read = run_lib.built_data(gone)
  assert read.source_dir == "" and gone.source_dir == str(tmp_path / "not-here")  # A copy.
  assert f"the run's source folder {tmp_path / 'not-here'} is not here" in caplog.text
  assert len(splits_lib.vqa_splits(read)["test"].records) == 6
  # Given on the command line, a missing source folder is the user's to correct.
  assert run_lib.built_data(gone, ["data.source_dir 'a' -> 'b'"]).source_dir == gone.source_dir


def test_results_that_cannot_be_written_are_refused_before_answering(tmp_path, monkeypatch):
  """A read-only run folder: the whole split was answered, then a traceback lost the
  results. (Checked with os.access: the tests may run as root, whom no mode stops.)"""
  locked = tmp_path / "run"
  locked.mkdir()
  # Readable, not writable.
  monkeypatch.setattr(os, "access",
                      lambda path, mode: Path(path) != locked or not mode & os.W_OK)
  with pytest.raises(PermissionError, match=rf"{locked}/eval/test-step4: {locked} cannot be "
                     r"written \(a read-only run folder\?\): pass --out=FOLDER"):
    run_lib.output_folder(None, locked / "eval" / "test-step4")
  elsewhere = tmp_path / "elsewhere" / "x"
  assert run_lib.output_folder(elsewhere, locked) == elsewhere  # --out=...
  assert not elsewhere.parent.exists()  # Checked, not made.


def test_replaced_results_are_named(tmp_path, caplog):
  """The same step and split evaluated again (perhaps under other overrides) replaced the
  earlier results without a word."""
  with caplog.at_level("WARNING"):
    run_lib.replacing_note(tmp_path)  # Nothing there yet.
  assert "replacing" not in caplog.text
  vqa.write(tmp_path, {"step": 8, "overall": 0.2424, "protocol": "p",
                       "config_changes": ["model.rank_k 8 -> 1"]}, [])
  with caplog.at_level("WARNING"):
    run_lib.replacing_note(tmp_path)
  assert (f"replacing the results in {tmp_path} (step 8, overall 24.2%, computed with "
          "model.rank_k 8 -> 1)") in caplog.text


def test_data_with_other_examples_in_the_same_numbers_are_not_the_runs(data):
  """The run's data are known by their counts and a digest of their ids, in order: a
  validation example swapped with a training one (the counts unchanged: another held-out
  slice, which would hold examples the run trained on) is refused."""
  import dataclasses
  from medvqa_jax.train import loop
  _, splits = data
  restored = types.SimpleNamespace(data=loop.data_identity(splits, 4, 0))
  run_lib.check_data(restored, splits)  # The run's own.
  train, val = splits["train"].records, splits["val"].records
  swapped = {"train": dataclasses.replace(splits["train"], records=[val[0]] + train[1:]),
             "val": dataclasses.replace(splits["val"], records=[train[0]] + val[1:])}
  with pytest.raises(ValueError, match=r"the data are not the run's: it trained on 10 examples "
                                       r"and validated on 2, and the data now give 10 and 2, "
                                       r"or other ids"):
    run_lib.check_data(restored, swapped)


def test_the_majority_baseline_is_the_training_answers(data, tmp_path, monkeypatch):
  """metrics.json's majority-answer baseline is the most frequent answer of the training
  part, never of the split evaluated (the test answers here are all distinct, so the test
  split's own "majority" is another answer)."""
  dc, splits = data
  train_majority = splits_lib.majority_answer(splits["train"].records)
  assert train_majority != splits_lib.majority_answer(splits["test"].records)
  monkeypatch.setattr(vqa, "answer_split", lambda predictor, params, split, **kw: [
      {"prediction": "yes"} for _ in split.records])
  config = ConfigDict(dict(model=dict(head="generative"), data=dc.to_dict(),
                           train=dict(eval_batch_size=4)))
  restored = types.SimpleNamespace(
      config=config, protocol=splits_lib.OPEN_SET, answers=["yes", "no"], changes=[],
      workdir=tmp_path, step=3, data={}, params=None, tokenizer=None,
      model=types.SimpleNamespace(image=types.SimpleNamespace(image_size=SIZE)),
      predictor=lambda candidates: types.SimpleNamespace(predictable=candidates))
  for split in ("test", "validation"):
    metrics = run_lib.evaluate_split(restored, split, out_dir=tmp_path / split)
    assert metrics["majority_baseline"]["answer"] == train_majority, split


def test_each_split_and_protocol_has_its_own_results_folder():
  """With data.test_split="validation" (a dataset whose test split is called so), the test
  results and the validation ones are filed apart, as are the two protocols' and the two
  re-scorings' (model.rank_score)."""
  for test_split in ("test", "validation"):
    dc = ConfigDict(dict(test_split=test_split, val_split="validation"))
    names = {run_lib.results_name(dc, role, 5, closed, score)
             for role in ("train", "val", "test") for closed in (False, True)
             for score in ("likelihood", "first_token_twice")}
    assert len(names) == 12, names
  dc = ConfigDict(dict(test_split="test", val_split="validation"))
  assert [run_lib.results_name(dc, r, 5, False) for r in ("test", "val")] == [
      "test-step5", "validation-step5"]
  assert run_lib.results_name(dc, "test", 5, True) == "test-step5-closed-set"
  assert run_lib.results_name(dc, "test", 5, True, "first_token_twice") == (
      "test-step5-closed-set-first-token-twice")


def test_the_overrides_an_evaluation_does_not_read_are_named_with_why():
  """A VQA evaluation reads no loss term, teacher, seed, optimiser or training batch; a
  pre-training run's validation reads its loss terms, teacher, seed, batch and workers.
  Checkpoint towers are built from the recorded architecture, a saved tokenizer copy wins."""
  fields = ["seed", "optim.lr", "train.batch_size", "train.eval_batch_size", "train.fsdp",
            "train.fsdp_rules", "train.fsdp_min_size", "train.deterministic",
            "losses.weights", "teacher.mode",
            "data.workers", "data.dir",
            "model.rank_k", "model.rank_score", "model.dropout", "model.num_answers",
            "model.image.checkpoint", "model.text.checkpoint", "model.text.tokenizer",
            "model.compute.attention"]
  saved = ConfigDict({"model": {"head": "generative", "image": {"source": "hf_clip"},
                                "text": {"source": "init"}}})
  run = {"towers": {"image": {}, "text": {}}}
  vqa_unused = run_lib.unused_overrides(fields, saved, run, tokenizer_copy=True)
  assert set(vqa_unused) == {"seed", "optim.lr", "train.batch_size", "train.fsdp",
                             "losses.weights", "teacher.mode", "data.workers", "model.dropout",
                             "model.num_answers", "model.image.checkpoint",
                             "model.text.tokenizer"}
  assert vqa_unused["model.image.checkpoint"] == ("the image tower is built from the "
                                                  "architecture the run recorded")
  assert "model.text.tokenizer" not in run_lib.unused_overrides(fields, saved, run, False)
  # What an override changes is filed; one that sets a field to its value changes nothing.
  saved.train = ConfigDict({"eval_batch_size": 32, "fsdp_min_size": 1024})
  assert run_lib.with_overrides(saved, {"train.eval_batch_size": 32,
                                        "train.fsdp_min_size": 4096})[1] == [
      "train.fsdp_min_size 1024 -> 4096"]
  # Only the generative head ranks candidates.
  saved.model.head = "classifier"
  assert run_lib.unused_overrides(["model.rank_k", "model.rank_score"], saved, run, True) == {
      f: "only the generative head ranks candidate answers"
      for f in ("model.rank_k", "model.rank_score")}
  saved.model.head = "none"
  pretraining_unused = run_lib.unused_overrides(fields, saved, run, tokenizer_copy=False)
  assert set(pretraining_unused) == {"optim.lr", "train.eval_batch_size", "train.fsdp",
                                     "model.dropout", "model.num_answers",
                                     "model.image.checkpoint", "model.rank_k",
                                     "model.rank_score"}


def test_a_run_saved_before_a_field_existed_evaluates_with_it_set():
  """model.rank_score and train.deterministic came after runs were trained: their configs,
  which lack them, read as ranking by likelihood and compiling XLA's default kernels (as they
  did), and an evaluation can set them like any field."""
  run = {"config": json.dumps({"model": {"head": "generative", "rank_k": 8},
                               "train": {"eval_batch_size": 16}})}
  saved = run_lib.saved_config(run)
  assert saved.model.rank_score == "likelihood" and saved.model.rank_k == 8
  assert saved.train.deterministic is False and saved.train.eval_batch_size == 16
  config, changes = run_lib.with_overrides(saved, {"model.rank_score": "first_token_twice",
                                                   "train.deterministic": True})
  assert config.model.rank_score == "first_token_twice" and config.train.deterministic
  assert changes == ["model.rank_score 'likelihood' -> 'first_token_twice'",
                     "train.deterministic False -> True"]
  # A run that set it keeps its value.
  run = {"config": json.dumps({"model": {"head": "generative",
                                         "rank_score": "first_token_twice"}})}
  assert run_lib.saved_config(run).model.rank_score == "first_token_twice"


def test_a_split_named_on_the_command_line_takes_its_role_from_the_dataset_names():
  """--split names a split by the dataset's own names first: with data.test_split set to
  "validation" (a dataset whose test answers are its validation split), --split=validation
  is the test split, not the validation slice."""
  split_role = run_lib.split_role
  usual = ConfigDict(dict(test_split="test", val_split="validation"))
  assert [split_role(usual, s) for s in ("train", "validation", "val", "test")] == [
      "train", "val", "val", "test"]
  held_out = ConfigDict(dict(test_split="validation", val_split=""))
  assert [split_role(held_out, s) for s in ("validation", "val", "test")] == [
      "test", "val", "test"]
  with pytest.raises(ValueError, match="unknown split 'dev'"):
    split_role(usual, "dev")


def test_an_eval_batch_of_none_is_refused_by_its_flag(tmp_path):
  """train.py refuses train.eval_batch_size < 1; eval.py's override of it ended in a
  ZeroDivisionError while batching."""
  import jax.numpy as jnp
  from configs import demo
  ckpts = ckpt_lib.Checkpoints(tmp_path / "checkpoints", keep=2)
  ckpts.save(2, {"step": jnp.int32(2)}, {"step": 2, "config": demo.get_config().to_json()})
  ckpts.close()
  with pytest.raises(ValueError, match=r"--config.train.eval_batch_size=0: must be 1 or more"):
    run_lib.restore(tmp_path, overrides={"train.eval_batch_size": 0})
  # A step the folder does not hold is named, with those it holds.
  with pytest.raises(FileNotFoundError, match=r"no checkpoint of step 5 in .*; it has \[2\]$"):
    run_lib.restore(tmp_path, step=5)


def test_a_step_folder_and_another_step_are_refused(tmp_path):
  """eval.py/predict.py --checkpoint_dir=<run>/checkpoints/4 --step=2: two different steps
  asked for (step 2 was evaluated, silently). The same step twice is taken."""
  (tmp_path / "checkpoints" / "4" / "state").mkdir(parents=True)
  with pytest.raises(ValueError, match=r"--step=2, but .*checkpoints/4 is the folder of step "
                     r"4: give one of them"):
    run_lib.restore(tmp_path / "checkpoints" / "4", step=2)
  # Past the check (a stand-in step folder, which Orbax lists but cannot read).
  with pytest.raises(ckpt_lib.UnreadableCheckpoint, match="checkpoint step 4 in"):
    run_lib.restore(tmp_path / "checkpoints" / "4", step=4)


def test_a_classifier_run_answers_alike_in_its_test_and_in_predict(tmp_path):
  """A classifier run end to end: predict.py's first answer and score for a test question are
  the run's test prediction and its softmax probability, for an image predict.py reads as the
  build stored it (shrunk to the run's data.max_side); its answers come most probable first."""
  from medvqa_jax.train import loop
  config = helpers.tiny_config()
  config.model.head = "classifier"
  source = helpers.demo_part(tmp_path / "source", train=200, test=12)
  config.data.update(dir=str(tmp_path / "data"), val_fraction=0.05, max_side=48,
                     source_dir=str(source))
  config.optim.total_steps = 4
  workdir = tmp_path / "run"
  config.train.update(workdir=str(workdir), epochs=0, batch_size=16, save_every=4,
                      eval_every=4, tensorboard=False)
  loop.train(config)
  row = json.loads((workdir / "eval" / "test" / "predictions.jsonl").read_text().splitlines()[0])
  (record,) = [r for r in json.loads((source / "testset.json").read_text())
               if str(r["qid"]) == row["qid"]]
  out = subprocess.run(
      [sys.executable, str(ROOT / "launch" / "predict.py"),
       f"--checkpoint_dir={workdir}", f"--image={source / 'images' / record['image_name']}",
       f"--question={row['question']}", "--top=4", "--out="], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  answers = json.loads(out.stdout)["answers"]
  assert answers[0]["answer"] == row["prediction"]
  assert answers[0]["score"] == pytest.approx(row["score"], rel=1e-4)  # float32.
  scores = [a["score"] for a in answers]
  assert len(scores) == 4 and scores == sorted(scores, reverse=True) and sum(scores) <= 1
