"""The soft-label teacher: its embeddings, the cache command, and the cache's checks."""

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import helpers
from medvqa_jax import ASSETS
from medvqa_jax.losses import teacher as teacher_lib
from medvqa_jax.models import state_dict

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  """A JSONL corpus over the bundled sample images (captions: their questions)."""
  return helpers.write_jsonl(tmp_path_factory.mktemp("corpus") / "train.jsonl",
                             helpers.sample_caption_rows())


@pytest.fixture(scope="module")
def built(corpus, tmp_path_factory):
  """The corpus built as a dataset (captions_jsonl), where the cache command reads it."""
  from medvqa_jax.data import builders
  data_dir = tmp_path_factory.mktemp("tfds")
  builders.build("captions_jsonl", corpus.parent, data_dir)
  return data_dir


@pytest.fixture(scope="module")
def demo_config():
  from configs import demo
  return demo.get_config()


def _run_cache(data_dir, out, *config_args):
  return subprocess.run([sys.executable, "launch/cache_teacher.py", "--config=configs/demo.py",
                         "--config.data.name=captions_jsonl", f"--config.data.dir={data_dir}",
                         # Not the demo's source folder: the built corpus is checked against it.
                         "--config.data.source_dir=", *config_args, f"--out={out}",
                         "--batch_size=3"],
                        capture_output=True, text=True, timeout=600, cwd=ROOT)


def _dataset_fields(data_dir) -> tuple[list, list, list]:
  """ids, captions and image ids of a built corpus's training split, as training reads them."""
  from medvqa_jax.data import builders
  source = builders.load(data_dir, "captions_jsonl", "train", decode_images=False)
  rows = [source[i] for i in range(len(source))]
  return tuple([r[k].decode() for r in rows] for k in ("id", "caption", "image_id"))


def test_the_cache_command_embeds_the_built_dataset_as_training_reads_it(corpus, demo_config,
                                                                        tmp_path):
  """The cache command reads the corpus the config trains on, built (here with images shrunk
  to another max_side than the config's: the cache still sees them as stored), so training
  accepts the cache; an unbuilt dataset without data.source_dir, or a VQA dataset, is
  refused naming what to do, and no cache file is left."""
  from medvqa_jax.data import builders
  builders.build("captions_jsonl", corpus.parent, tmp_path / "tfds", max_side=16)
  assert demo_config.data.max_side != 16
  out = tmp_path / "cache.npz"
  run = _run_cache(tmp_path / "tfds", out)
  assert run.returncode == 0, run.stderr
  teacher_lib.TeacherCache.load(out).check(*_dataset_fields(tmp_path / "tfds"),
                                           teacher_lib.from_config(demo_config).fingerprint())
  out.unlink()
  unbuilt = _run_cache(tmp_path / "nothing", out, "--config.data.source_dir=")
  assert unbuilt.returncode != 0 and "prepare_data.py --dataset=captions_jsonl" in unbuilt.stderr
  vqa = _run_cache(tmp_path / "tfds", out, "--config.data.name=vqa_rad")
  # The command reads a caption corpus (it said "this config runs pre-training" of any config).
  assert vqa.returncode != 0 and ("is a VQA dataset, but launch/cache_teacher.py reads a "
                                  "caption corpus") in vqa.stderr, vqa.stderr[-2000:]
  # The split embedded is the config's training split (data.train_split): one the corpus
  # lacks is refused (the train split was embedded instead).
  other = _run_cache(tmp_path / "tfds", out, "--config.data.train_split=validation")
  assert other.returncode == 1 and ("error: captions_jsonl has no split 'validation'; it has "
                                    "['train']") in other.stderr, other.stderr[-2000:]
  assert not out.exists() and not list(tmp_path.glob(".cache.npz.tmp*"))
  # A folder as --out: refused before the embeddings are computed (it failed after them).
  folder = tmp_path / "a_folder"
  folder.mkdir()
  taken = _run_cache(tmp_path / "tfds", folder)
  assert taken.returncode == 1 and f"--out={folder}: is a folder" in taken.stderr
  assert not list(folder.iterdir())
  # Inside a file: refused before too (a FileExistsError traceback after them).
  inside = tmp_path / "a_file" / "sub" / "cache.npz"
  inside.parent.parent.write_text("")
  taken = _run_cache(tmp_path / "tfds", inside)
  assert taken.returncode == 1, taken.stderr[-2000:]
  assert (f"error: --out={inside}: cannot be written ({inside.parent.parent} is a file)"
          in taken.stderr and "teacher embeddings" not in taken.stderr), taken.stderr[-2000:]


def test_cache_command_and_checks(built, demo_config, tmp_path):
  out = tmp_path / "cache.npz"
  run = _run_cache(built, out)
  assert run.returncode == 0, run.stderr
  summary = json.loads(run.stdout.strip().splitlines()[-1])
  assert summary["examples"] == 8 and summary["width"] == 32 and summary["logit_scale"] == 50
  # In forward passes of --batch_size examples: the progress shows the first batch's 3.
  assert re.search(r"teacher embeddings: [^\r\n]*\b3/8\b", run.stderr), run.stderr[-2000:]

  cache = teacher_lib.TeacherCache.load(out)
  teacher = teacher_lib.from_config(demo_config)
  records = teacher_lib.DatasetRecords(built, "captions_jsonl")
  # Each row is the teacher's embedding of that example (8 records, batches of 3, padded).
  direct = teacher_lib.compute_cache(teacher, records[::-1], batch_size=8, progress=False)
  batch = cache.lookup([r["id"] for r in records[::-1]])
  np.testing.assert_allclose(batch["teacher_image"], direct.image, atol=1e-5)
  np.testing.assert_allclose(batch["teacher_text"], direct.text, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(batch["teacher_text"], axis=-1), 1, atol=1e-5)
  assert batch["teacher_scale"] == 50

  ids, captions, image_ids = _dataset_fields(built)
  assert ids == [r["id"] for r in records] and len(set(ids)) == 8
  fingerprint = teacher.fingerprint()
  cache.check(ids, captions, image_ids, fingerprint)  # Matches: no error.
  direct.check(ids, captions, image_ids, fingerprint)  # Computed in another order: the same.
  with pytest.raises(ValueError, match="other data"):
    cache.check(ids, captions[:-1] + ["a different caption"], image_ids, fingerprint)
  with pytest.raises(ValueError, match="no embeddings for 1 example"):
    cache.check(ids + ["rad-new"], captions + ["x"], image_ids + ["0"], fingerprint)
  # Same ids and captions, the images moved one row over: refused (was used silently).
  moved = [image_ids[(n + 1) % len(ids)] for n in range(len(ids))]
  assert len(set(image_ids)) > 1
  with pytest.raises(ValueError, match=r"other images than the dataset's for \d+ example"):
    cache.check(ids, captions, moved, fingerprint)
  # One image per example in the cache, two in the dataset (a multi-view corpus): refused
  # (the second view's target silently fell back to the first's); and the other way round.
  with pytest.raises(ValueError, match=r"holds one image per example, the dataset two "
                                       r"images \(views\).*Rebuild it for this dataset"):
    cache.check(ids, captions, image_ids, fingerprint, image2_ids=image_ids)
  # Second views: the next example's image (the first's digests are the second's).
  shifted = records[1:] + records[:1]
  two = teacher_lib.compute_cache(teacher, [dict(r, image2=s["image"]) for r, s in
                                            zip(records, shifted)], batch_size=8, progress=False)
  two.save(tmp_path / "two.npz")
  two = teacher_lib.TeacherCache.load(tmp_path / "two.npz")
  two.check(ids, captions, image_ids, fingerprint, image2_ids=moved)
  # Each example's second-view embedding is the teacher's embedding of its second image (the
  # next example's first), stored and looked up (the first view's stood in for it, unseen).
  np.testing.assert_allclose(two.lookup(ids)["teacher_image2"],
                             cache.lookup([r["id"] for r in shifted])["teacher_image"], atol=1e-5)
  np.testing.assert_allclose(two.lookup(ids)["teacher_image"], cache.lookup(ids)["teacher_image"],
                             atol=1e-5)
  with pytest.raises(ValueError, match=r"holds two images \(views\) per example, the dataset "
                                       r"one image"):
    two.check(ids, captions, image_ids, fingerprint)
  # The same first images, ids and captions, other second views (a rebuild that paired other
  # views): refused (only the second view's presence was checked).
  with pytest.raises(ValueError, match=r"other images than the dataset's for \d+ example"):
    two.check(ids, captions, image_ids, fingerprint, image2_ids=image_ids)
  # A teacher whose tokenizer has another vocabulary (two words swapped: the same size) reads
  # other token ids: another teacher.
  swapped = tmp_path / "vocab"
  swapped.mkdir()
  words = (ASSETS / "bert_uncased_vocab" / "vocab.txt").read_text().split("\n")
  a, b = words.index("chest"), words.index("lung")
  words[a], words[b] = words[b], words[a]
  (swapped / "vocab.txt").write_text("\n".join(words))
  other = demo_config.copy_and_resolve_references()
  other.teacher.text.tokenizer = str(swapped)
  with pytest.raises(ValueError, match="another teacher"):
    cache.check(ids, captions, image_ids, teacher_lib.from_config(other).fingerprint())
  other = demo_config.copy_and_resolve_references()
  other.teacher.text.arch.proj_dim = 48  # Towers of no shared space: refused (a cache was
  with pytest.raises(ValueError, match=r"image embeddings are 32 wide and its text "  # built,
                                       r"embeddings 48: .*one CLIP-like model"):  # then failed
    teacher_lib.from_config(other)  # in the first step's loss).
  other = demo_config.copy_and_resolve_references()
  other.teacher.image.arch.depth = 1
  with pytest.raises(ValueError, match="another teacher"):
    cache.check(ids, captions, image_ids, teacher_lib.from_config(other).fingerprint())
  # Settings that change the embeddings but not the weights (the cache was accepted): the
  # same parameters, another teacher. The compute dtype only rounds: the same teacher.
  other = demo_config.copy_and_resolve_references()
  other.teacher.image.arch.ln_eps = 1e-2
  changed = teacher_lib.from_config(other)
  assert teacher_lib.params_fingerprint(changed.image_params, changed.text_params) == \
      teacher_lib.params_fingerprint(teacher.image_params, teacher.text_params)
  with pytest.raises(ValueError, match="another teacher"):
    cache.check(ids, captions, image_ids, changed.fingerprint())
  import dataclasses
  import jax
  import jax.numpy as jnp
  # Other weights of the same shapes (a fine-tuned copy of the checkpoint), another caption
  # length or another logit scale: another teacher.
  scaled = dataclasses.replace(teacher, image_params=jax.tree.map(lambda x: x * 1.5,
                                                                  teacher.image_params))
  for field, value in (("text.max_len", 8), ("logit_scale", 20.0)):
    other = demo_config.copy_and_resolve_references()
    other.teacher.update_from_flattened_dict({field: value})
    changed = teacher_lib.from_config(other)
    assert changed.tokenizer.max_len == 8 or changed.logit_scale == 20
    with pytest.raises(ValueError, match="another teacher"):
      cache.check(ids, captions, image_ids, changed.fingerprint())
  with pytest.raises(ValueError, match="another teacher"):
    cache.check(ids, captions, image_ids, scaled.fingerprint())
  bf16 = dataclasses.replace(teacher, image=teacher.image.clone(dtype=jnp.bfloat16),
                             text=teacher.text.clone(dtype=jnp.bfloat16))
  assert bf16.fingerprint() == fingerprint
  # A cache of an earlier format (no image ids; the original images) is refused as such.
  with np.load(out) as z:
    arrays = {k: z[k] for k in z.files if k != "image_ids"}
  meta = json.loads(str(arrays["meta"]))
  for old in (2, 3, 4, 5):
    arrays["meta"] = np.asarray(json.dumps({**meta, "format": old}))
    np.savez(tmp_path / "old.npz", **arrays)
    with pytest.raises(ValueError, match=f"has format {old}, expected "
                       f"{teacher_lib.FORMAT_VERSION}: rebuild it"):
      teacher_lib.TeacherCache.load(tmp_path / "old.npz")
  arrays["meta"] = np.asarray(json.dumps(meta))  # The format, without its image ids.
  np.savez(tmp_path / "partial.npz", **arrays)
  (tmp_path / "cut.npz").write_bytes(out.read_bytes()[:1000])
  for broken in ("partial.npz", "cut.npz"):
    with pytest.raises(ValueError, match=r"is unreadable or incomplete"):
      teacher_lib.TeacherCache.load(tmp_path / broken)


def test_biomedclip_teacher_matches_open_clip(biomedclip, monkeypatch, tmp_path):
  """The teacher path on a BiomedCLIP-architecture checkpoint: normalised embeddings equal
  open_clip's, and the logit scale is the checkpoint's exp(logit_scale). Both towers and
  the scale come from one read of the checkpoint file."""
  import shutil

  from configs import base
  ref, folder = biomedclip
  config = base.get_config()
  for part in ("image", "text"):
    config.teacher[part].checkpoint = str(folder)
  # The tiny text tower's 120 rows: the bundled vocabulary's first 120 tokens.
  vocab = tmp_path / "vocab"
  shutil.copytree(ASSETS / "bert_uncased_vocab", vocab)
  words = (vocab / "vocab.txt").read_text().split("\n")
  (vocab / "vocab.txt").write_text("\n".join(words[:120]) + "\n")
  config.teacher.text.tokenizer = str(vocab)
  reads = helpers.count_calls(monkeypatch, state_dict, "_read")
  teacher = teacher_lib.from_config(config)
  assert len(reads) == 1
  np.testing.assert_allclose(teacher.logit_scale, float(ref.logit_scale.detach().exp()), rtol=1e-6)
  rng = np.random.default_rng(0)
  pixels = rng.normal(size=(2, 224, 224, 3)).astype(np.float32)
  ids = np.array([[2, 7, 9, 11, 3, 0], [2, 5, 3, 0, 0, 0]])
  image, text = teacher.embed(pixels, ids, (ids != 0).astype(np.int32))
  with torch.no_grad():
    ref_image = ref.encode_image(torch.from_numpy(pixels).permute(0, 3, 1, 2), normalize=True)
    ref_text = ref.encode_text(torch.from_numpy(ids), normalize=True)
  np.testing.assert_allclose(image, ref_image.numpy(), atol=1e-5)
  np.testing.assert_allclose(text, ref_text.numpy(), atol=1e-5)
  # A frozen teacher with parameters initialised fresh (a projection its checkpoint lacks)
  # would give soft labels from random weights: refused.
  config.teacher.image.fresh = ("head/.*",)
  with pytest.raises(ValueError, match=r"teacher.image.fresh=\('head/\.\*',\): the teacher "
                                       r"is frozen"):
    teacher_lib.from_config(config)


def test_dataset_records_are_read_when_asked_for(built, demo_config, monkeypatch):
  """A built corpus's records, images included, were all read into a list before the first
  was embedded: several GB for ROCO at 512 px. They are read a batch at a time; reading
  them gives the dataset's examples."""
  from medvqa_jax.data import builders
  reads = []
  load = builders.load

  def counted(*args, **kwargs):
    source = load(*args, **kwargs)

    class Counted:
      def __len__(self):
        return len(source)

      def __getitem__(self, i):
        reads.append(i)
        return source[i]
    return Counted()
  monkeypatch.setattr(builders, "load", counted)
  records = teacher_lib.DatasetRecords(built, "captions_jsonl")
  assert len(records) == 8 and reads == []  # Nothing read until asked for.
  ids, captions, _ = _dataset_fields(built)
  stored = load(built, "captions_jsonl", "train", decode_images=False)
  assert records[2] == {"id": ids[2], "caption": captions[2], "image": stored[2]["image"]}
  assert records[-1] == records[7] and [r["id"] for r in records[5:1:-2]] == ids[5:1:-2]
  with pytest.raises(IndexError):
    records[8]
  # compute_cache takes them a batch at a time (the first once more, for its fields).
  reads.clear()
  teacher = teacher_lib.from_config(demo_config)
  teacher_lib.compute_cache(teacher, records, batch_size=3, progress=False)
  assert sorted(reads) == [0] + list(range(8)), reads
  for start in (0, 3, 6):  # Each batch's records read together, in order.
    batch = reads[1:][start:start + 3]
    assert batch == list(range(start, min(start + 3, 8))), reads


def test_the_cache_refuses_repeated_ids_and_mixed_views(demo_config):
  teacher = teacher_lib.from_config(demo_config)
  rows = helpers.sample_caption_rows()[:5]
  with pytest.raises(ValueError, match=rf"example ids must be unique: records 1 and 4 are both "
                                       rf"'{rows[1]['id']}'"):
    teacher_lib.compute_cache(teacher, rows[:4] + [dict(rows[4], id=rows[1]["id"])],
                              batch_size=2, progress=False)
  # A second image on some records only: refused (it was dropped without a word).
  with pytest.raises(ValueError, match=r"record 3 \(\S+\) has a second image \('image2'\), "
                                       r"which record 0 lacks"):
    teacher_lib.compute_cache(teacher, rows[:3] + [dict(rows[3], image2=rows[0]["image"])],
                              batch_size=2, progress=False)
  with pytest.raises(ValueError, match=r"record 1 \(\S+\) lacks a second image \('image2'\), "
                                       r"which record 0 has"):
    teacher_lib.compute_cache(teacher, [dict(rows[0], image2=rows[1]["image"])] + rows[1:],
                              batch_size=2, progress=False)


def test_the_cache_holds_what_the_online_teacher_computes(demo_config):
  """cache_teacher and the pipeline's online teacher give the teacher the same inputs: the
  image resized to its size and the cleaned caption."""
  from medvqa_jax.data import image as image_lib
  from medvqa_jax.data import pipeline
  from medvqa_jax.data import tokenizer as tokenizer_lib
  teacher = teacher_lib.from_config(demo_config)
  records = helpers.sample_caption_rows()[:6]
  records[0] = dict(records[0], caption="Is THIS a Chest X-ray? (PA view)")
  cache = teacher_lib.compute_cache(teacher, records, batch_size=8, progress=False)
  example = pipeline._Example("caption", tokenizer_lib.from_config(demo_config.model.text), 32,
                              "pretrain", teacher=(teacher.tokenizer, teacher.image_size))
  rows = [example({"id": r["id"], "image": np.asarray(image_lib.open_image(r["image"])),
                   "caption": r["caption"]}, np.random.default_rng(0)) for r in records]
  image, text = teacher.embed(*(np.stack([r[k] for r in rows]) for k in (
      "teacher_pixels", "teacher_input_ids", "teacher_attention_mask")))
  np.testing.assert_allclose(cache.image, image, atol=1e-5)
  np.testing.assert_allclose(cache.text, text, atol=1e-5)


def test_the_cache_embeds_the_images_the_online_teacher_sees_in_a_shrunk_build(corpus,
                                                                              demo_config,
                                                                              tmp_path):
  """A build with max_side below the images' size stores them shrunk and re-encoded; the
  online teacher sees those. The cache, made from the built dataset, embeds the same pixels
  (it once embedded the original files: other pixels, other soft labels)."""
  from medvqa_jax.data import builders, pipeline
  from medvqa_jax.data import tokenizer as tokenizer_lib
  builders.build("captions_jsonl", corpus.parent, tmp_path / "tfds", max_side=40)
  source = builders.load(tmp_path / "tfds", "captions_jsonl", "train")
  teacher = teacher_lib.from_config(demo_config)
  records = teacher_lib.DatasetRecords(tmp_path / "tfds", "captions_jsonl")
  cache = teacher_lib.compute_cache(teacher, records, batch_size=8, progress=False)
  example = pipeline._Example("caption", tokenizer_lib.from_config(demo_config.model.text), 32,
                              "pretrain", teacher=(teacher.tokenizer, teacher.image_size))
  stored = {source[i]["id"].decode(): source[i] for i in range(len(source))}
  assert min(stored[records[0]["id"]]["image"].shape[:2]) == 40  # Shrunk by the build.
  rows = [example(stored[r["id"]], np.random.default_rng(0)) for r in records]
  image, _ = teacher.embed(*(np.stack([r[k] for r in rows]) for k in (
      "teacher_pixels", "teacher_input_ids", "teacher_attention_mask")))
  np.testing.assert_allclose(cache.image, image, atol=1e-5)


def test_the_teacher_reads_what_the_student_reads():
  """Unset, the teacher's caption length follows the student's, from the command line too
  (it kept the config file's value), at most what its text tower reads; a length past its
  positions is refused by name when the teacher is built (it was, at the first step)."""
  from configs import pretrain_stage0
  from medvqa_jax.data import tokenizer as tokenizer_lib
  from medvqa_jax.models import bert

  def teacher_length(**changes):
    config = pretrain_stage0.get_config("image=tiny,text=tiny,teacher=tiny")
    config.teacher.text.tokenizer = str(ASSETS / "bert_uncased_vocab")
    config.model.text.max_len = changes.pop("student", config.model.text.max_len)
    config.teacher.text.update(changes)
    return teacher_lib.from_config(config).tokenizer.max_len

  assert teacher_length() == 64  # The tiny towers' 64 positions, as the student.
  assert teacher_length(student=32) == 32
  assert teacher_length(student=120) == 64  # At most what the teacher reads.
  assert teacher_length(max_len=16) == 16
  with pytest.raises(ValueError, match=r"teacher.text.max_len=100: the teacher's text tower "
                                       r"reads at most 64 tokens"):
    teacher_length(max_len=100)
  # The student's length is checked the same way, before the model is traced.
  tok = tokenizer_lib.Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", 600)
  with pytest.raises(ValueError, match=r"model.text.max_len=600: the text tower reads at most "
                                       r"512 tokens"):
    tokenizer_lib.check_fits(tok, {"text tower": bert.BertEncoder(), "decoder": None})


def test_the_teacher_runs_its_stacks_as_model_compute_says(demo_config):
  """The teacher's towers run as the student's stacks do (the attention kernel, scan):
  `model.compute` was not passed to them (they ran the reference attention, unrolled). It
  changes the embeddings by rounding at most, and the fingerprint (a cache's key) not at all."""
  from medvqa_jax.models import amif
  config = demo_config.copy_and_resolve_references()
  plain = teacher_lib.from_config(config)
  config.model.compute.update(attention="xla", scan=True)
  teacher = teacher_lib.from_config(config)
  assert teacher.image.compute == teacher.text.compute == amif.compute_of(config)
  assert teacher.image.compute != plain.image.compute
  assert teacher.fingerprint() == plain.fingerprint()
  size = teacher.image_size
  pixels = np.random.default_rng(0).integers(0, 256, (2, size, size, 3)).astype(np.uint8)
  ids = np.array([[101, 2003, 2023, 102], [101, 2054, 102, 0]], np.int32)
  for a, b in zip(teacher.embed(pixels, ids, (ids > 0).astype(np.int32)),
                  plain.embed(pixels, ids, (ids > 0).astype(np.int32))):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_a_teacher_computing_in_bf16_is_warned_of(demo_config, caplog):
  """Its soft labels are softmax(logit scale x similarity): bf16's rounding moves them (the
  bf16 presets leave the teacher in float32, so only a hand-set dtype does this)."""
  import logging
  import jax.numpy as jnp
  config = demo_config.copy_and_resolve_references()
  with caplog.at_level(logging.WARNING, logger=teacher_lib.__name__):
    teacher_lib.from_config(config)
  assert "soft labels' source" not in caplog.text
  config.teacher.text.dtype = "bfloat16"
  with caplog.at_level(logging.WARNING, logger=teacher_lib.__name__):
    teacher = teacher_lib.from_config(config)
  assert teacher.text.dtype == jnp.bfloat16
  assert ("teacher.text.dtype=bfloat16: the teacher's embeddings are the soft labels' source"
          in caplog.text) and "teacher.image" not in caplog.text
  assert f"logit scale ({teacher.logit_scale:.1f})" in caplog.text
