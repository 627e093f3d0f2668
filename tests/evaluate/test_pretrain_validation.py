"""Pre-training validation: retrieval recall, the held-out slice of a caption corpus."""

import json
import shutil

import numpy as np
import pytest
from ml_collections import ConfigDict

import helpers
from medvqa_jax.data import builders, splits as splits_lib
from medvqa_jax.evaluate import pretrain as pretrain_eval


def _recall_by_sorting(image, text, k, groups=None):
  """Recall@k by sorting each query's candidates (no ties in random embeddings): a hit when
  the first candidate of the query's group (default: its own pair) is among the first k."""
  groups = list(range(len(image))) if groups is None else groups
  scores = image @ text.T
  first = lambda row, g: min(list(np.argsort(-row)).index(j) for j in range(len(row))
                             if groups[j] == g)
  i2t = [first(scores[i], groups[i]) < k for i in range(len(image))]
  t2i = [first(scores[:, j], groups[j]) < k for j in range(len(text))]
  return np.mean(i2t), np.mean(t2i)


def test_retrieval_recall_matches_sorting():
  rng = np.random.default_rng(0)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  image = unit(rng.normal(size=(40, 8)))
  text = unit(image + 0.8 * rng.normal(size=(40, 8)))  # Noisy pairs: recall between 0 and 1.
  got = pretrain_eval.retrieval(image, text, ks=(1, 5, 10))
  for k in (1, 5, 10):
    i2t, t2i = _recall_by_sorting(image, text, k)
    assert got[f"i2t_r{k}"] == pytest.approx(i2t) and got[f"t2i_r{k}"] == pytest.approx(t2i)
  assert 0 < got["i2t_r1"] < got["i2t_r10"] < 1
  # Text->image differs from image->text: the score matrix is not symmetric.
  assert got["i2t_r1"] != got["t2i_r1"] or got["i2t_r5"] != got["t2i_r5"]
  perfect = pretrain_eval.retrieval(image, image)
  assert all(v == 1.0 for v in perfect.values())


def test_retrieval_breaks_ties_at_random_and_matches_other_captions_of_a_picture():
  """Ties counted in the query's favour gave a collapsed model (all embeddings equal) perfect
  recall; and another caption of the same picture, held out with it, counted as a miss."""
  n = 40
  collapsed = pretrain_eval.retrieval(np.ones((n, 4)), np.ones((n, 4)))
  for k in (1, 5, 10):  # Chance: the right answer anywhere among n equal scores.
    assert collapsed[f"i2t_r{k}"] == pytest.approx(k / n)
    assert collapsed[f"t2i_r{k}"] == pytest.approx(k / n)
  # One query's pair tied with 3 wrong candidates, none above: a hit at 1 one time in 4.
  image = np.eye(6)[:5]
  text = np.eye(6)[:5]
  image[0] = text[0] + text[1] + text[2] + text[3]
  got = pretrain_eval.retrieval(image, text, ks=(1, 2, 5))
  assert got["i2t_r1"] == pytest.approx((0.25 + 4) / 5)
  assert got["i2t_r2"] == pytest.approx((0.5 + 4) / 5) and got["i2t_r5"] == 1.0
  # A picture with two captions (rows 0 and 1): each of its rows answers the other's query.
  rng = np.random.default_rng(1)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  text = unit(rng.normal(size=(8, 16)))
  image = text.copy()
  image[1] = image[0]  # One picture: a perfect model embeds it once, near both captions.
  text[1] = unit(text[0] + 0.1 * rng.normal(size=16))
  groups = ["a", "a", "b", "c", "d", "e", "f", "g"]
  assert pretrain_eval.retrieval(image, text, ks=(1,))["i2t_r1"] < 1  # Without groups.
  assert all(v == 1.0 for v in pretrain_eval.retrieval(image, text, groups, (1,)).values())
  # The best answer of the query's group counts, not its own pair's: image 0 is nearest its
  # picture's other caption (row 1), a wrong caption (row 2) in between.
  eye = np.eye(4)
  near_other = eye.copy()
  near_other[0] = 0.2 * eye[0] + eye[1] + 0.5 * eye[2]
  assert pretrain_eval.retrieval(near_other, eye, ["a", "a", "b", "c"], (1,))["i2t_r1"] == 1.0
  # A wrong answer is still one: swapped pictures of different groups miss.
  swapped = pretrain_eval.retrieval(image[[2, 2, 1, 3, 4, 5, 6, 7]], text, groups, (1,))
  assert swapped["i2t_r1"] == pytest.approx(5 / 8)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """The 8 sample questions as captions (4 pictures, 2 captions each), each under 5 ids; one
  picture also read from a copy at another path."""
  folder = tmp_path_factory.mktemp("corpus")
  rows = helpers.sample_caption_rows()
  rows = [dict(r, id=f"{r['id']}-{n}") for n in range(5) for r in rows]  # 40 examples.
  shutil.copy(rows[0]["image"], folder / "copy.jpg")
  rows[8]["image"] = "copy.jpg"  # rows[8] shows rows[0]'s picture, from another path.
  helpers.write_jsonl(folder / "train.jsonl", rows)
  return folder


def _data(corpus, tmp, **kw):
  dc = ConfigDict(dict(name="captions_jsonl", dir=str(tmp / "tfds"), source_dir=str(corpus),
                       max_side=None, train_split="train", val_split="", val_fraction=0.25))
  dc.update(kw)
  return dc


def test_caption_splits_hold_out_a_seeded_slice_of_whole_images(corpus, tmp_path):
  splits = splits_lib.caption_splits(_data(corpus, tmp_path))
  train, val = ([r["id"] for r in splits[s].records] for s in ("train", "val"))
  assert len(val) == 10 and len(train) == 30 and not set(train) & set(val)
  # An image id is the picture's, whatever the example's id or path: 1 of the 4 pictures is
  # held out with all 10 of its examples, and none is on both sides.
  ids = {r["id"]: r["image_id"] for s in ("train", "val") for r in splits[s].records}
  rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
  assert rows[8]["image"] == "copy.jpg" and ids[rows[8]["id"]] == ids[rows[0]["id"]]
  assert len({ids[r["id"]] for r in rows}) == 4
  images = {s: {r["image_id"] for r in splits[s].records} for s in ("train", "val")}
  assert len(images["val"]) == 1 and not images["train"] & images["val"]
  source = builders.load(tmp_path / "tfds", "captions_jsonl", "train")
  assert sorted(train + val) == sorted(str(source[i]["id"].decode()) for i in range(len(source)))
  # The sources hold those examples (images and captions), in the records' order.
  for name in ("train", "val"):
    split = splits[name]
    assert [split.source[i]["id"].decode() for i in range(len(split.source))] == \
        [r["id"] for r in split.records]
  again = splits_lib.caption_splits(_data(corpus, tmp_path))
  assert [r["id"] for r in again["val"].records] == val  # Seeded: the same every run.
  assert set(splits_lib.caption_splits(_data(corpus, tmp_path, val_fraction=0.0))) == {"train"}
  with pytest.raises(ValueError, match="val_split=''"):
    splits_lib.caption_splits(_data(corpus, tmp_path, val_split="validation"))


def _validation_config():
  """The tiny model with stage 1's objective (no teacher: hard-label itgc and imvc; OT and
  ITM), BERT dropout 0.1, batches of 4."""
  from configs import pretrain_stage1
  config = helpers.tiny_config()
  stage = pretrain_stage1.get_config("image=tiny,text=tiny,teacher=tiny")
  config.model.head = "none"
  config.model.dropout = 0.1
  config.losses = stage.losses
  config.train.batch_size = 4
  config.data.workers = 0
  config.seed = 3
  return config


def test_validator_runs_without_dropout_and_averages_the_batches():
  """Over a 9-example slice (2 full batches of 4, the ninth left out), val_<term> is the mean
  over the batches of the objective's terms with dropout off (train=False), each batch's
  inputs and key as the validator draws them (the ITM negatives: batch i's from
  fold_in(key, i)); the recalls are those of the 8 examples' embeddings, by sorting, two of
  them captions of one picture (each the other's match). Dropout on gives other values, and
  so does one key for both batches, so a validator that trained (dropout on) or drew every
  batch's negatives alike would not pass."""
  import jax

  from medvqa_jax.data import pipeline
  from medvqa_jax.data import tokenizer as tokenizer_lib
  from medvqa_jax.losses.pretrain import pretrain_terms
  from medvqa_jax.models import amif
  from medvqa_jax.train import sharding
  config = _validation_config()
  model, params = amif.create(config)
  tokenizer = tokenizer_lib.from_config(config.model.text)
  rng = np.random.default_rng(0)
  source = [{"id": f"c{i}", "image": rng.integers(0, 255, (40, 48, 3), np.uint8),
             "caption": f"axial ct of the chest number {i} with a lesion"} for i in range(9)]
  groups = ["p0", "p1", "p2", "p0", "p4", "p5", "p6", "p7", "p8"]  # c0 and c3: one picture.
  split = splits_lib.Split("val", source, [{"id": ex["id"], "image_id": g}
                                           for ex, g in zip(source, groups)])
  size = model.image.image_size
  validator = pretrain_eval.Validator(model, config, split, tokenizer, size,
                                      sharding.make_mesh())
  got = validator(params, step=7)
  assert got["val_examples"] == 8

  ds = pipeline.batches(source[:8], kind="caption", tokenizer=tokenizer, image_size=size,
                        global_batch=4, seed=config.seed, augmentation="pretrain",
                        shuffle=False, repeat=False)
  assert len(ds) == 2
  terms = jax.jit(lambda b, k, train: pretrain_terms(model, params, b, k, config.losses,
                                                     train=train), static_argnums=2)
  key = jax.random.PRNGKey(config.seed)
  per_batch, dropped, one_key, images, texts = [], [], [], [], []
  for i in range(2):
    batch = {k: v for k, v in ds[i].items() if k != "id"}
    _, m, out = terms(batch, jax.random.fold_in(key, i), False)
    per_batch.append({k: float(v) for k, v in m.items()})
    images.append(np.asarray(out["image_embed"]))
    texts.append(np.asarray(out["text_embed"]))
    dropped.append(float(terms(batch, jax.random.fold_in(key, i), True)[1]["loss"]))
    one_key.append(float(terms(batch, key, False)[1]["itm"]))
  names = {k for k in per_batch[0] if not k.startswith("temperature_")}
  assert names >= {"loss", "itgc", "imvc", "wpa", "itm"}
  assert {k for k in got if not k.startswith(("val_i2t", "val_t2i"))} == \
      {f"val_{k}" for k in names} | {"val_examples"}
  for k in names:
    want = np.mean([b[k] for b in per_batch])
    assert got[f"val_{k}"] == pytest.approx(want, rel=1e-5, abs=1e-6), k
  # Dropout does change the loss, by far more than the tolerance.
  assert abs(np.mean(dropped) - got["val_loss"]) > 1e-3 * abs(got["val_loss"])
  # So do other negatives: the same key for both batches.
  assert abs(np.mean(one_key) - got["val_itm"]) > 1e-3 * abs(got["val_itm"])
  image, text = np.concatenate(images), np.concatenate(texts)
  for k in (1, 5):
    i2t, t2i = _recall_by_sorting(image.astype(np.float64), text.astype(np.float64), k,
                                  groups[:8])
    assert got[f"val_i2t_r{k}"] == pytest.approx(i2t) and got[f"val_t2i_r{k}"] == \
        pytest.approx(t2i)
  assert got["val_i2t_r10"] == got["val_t2i_r10"] == 1.0  # 8 candidates: always found.


def test_a_batch_the_devices_do_not_divide_is_refused_by_name():
  """Evaluating a pre-training run on another machine (eval.py) validates in batches of its
  train.batch_size: one that the device count does not divide was a crash in the sharding."""
  import types
  config = ConfigDict(dict(train=dict(batch_size=8)))
  with pytest.raises(ValueError, match=r"train.batch_size \(8\), which must be divisible by "
                                       r"the device count \(3\)"):
    pretrain_eval.Validator(None, config, None, None, 32, types.SimpleNamespace(size=3))
