"""Tokenizers from local folders: CLIP BPE against OpenAI's own tokenizer (shipped with
open_clip), and clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest

from medvqa_jax import ASSETS
from medvqa_jax.data.tokenizer import Tokenizer, from_config

TEXTS = [
    "Is there a pneumothorax?",
    "what organ system is evaluated primarily in this image",
    "Are the lateral ventricles dilated, and is the X-ray AP or PA? " * 3,  # Truncated.
    "no",
]


@pytest.fixture(scope="module")
def clip_bpe_folder(tmp_path_factory):
  """The real CLIP BPE vocabulary, written as the vocab.json + merges.txt pair that Hugging
  Face CLIP folders hold."""
  from open_clip.tokenizer import SimpleTokenizer
  ref = SimpleTokenizer()
  folder = tmp_path_factory.mktemp("clip_bpe")
  # open_clip names the special tokens <start_of_text>/<end_of_text>; HF folders use OpenAI's.
  rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
  vocab = {rename.get(k, k): v for k, v in ref.encoder.items()}
  assert "<|endoftext|>" in vocab
  (folder / "vocab.json").write_text(json.dumps(vocab))
  merges = sorted(ref.bpe_ranks, key=ref.bpe_ranks.get)
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
  return folder


def test_clip_bpe_matches_openai_tokenizer(clip_bpe_folder):
  import open_clip
  tok = Tokenizer.from_folder(clip_bpe_folder, max_len=16)
  assert tok.vocab_size == 49408
  ours = tok(TEXTS)
  ref = open_clip.tokenize(TEXTS, context_length=16).numpy()
  mask = ours["attention_mask"].astype(bool)
  np.testing.assert_array_equal(mask, ref != 0)
  np.testing.assert_array_equal(ours["input_ids"][mask], ref[mask])
  assert ours["input_ids"].dtype == np.int32 and ours["input_ids"].shape == (4, 16)
  assert ours["input_ids"][2, -1] == 49407  # Truncation keeps the end-of-text token.


def test_bundled_bert_vocabulary_tokenizes_real_words():
  tok = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=12)
  batch = tok(["Is the spleen normal size?"])
  ids = batch["input_ids"][0]
  assert ids[0] == tok.hf.cls_token_id and tok.hf.unk_token_id not in ids
  assert tok.hf.decode(ids[batch["attention_mask"][0] == 1], skip_special_tokens=True) == \
      "is the spleen normal size?"


def test_a_length_asked_for_replaces_the_tokenizers_own():
  """`max_len` in a call (the answer candidates' length) cuts and pads to it, in place of
  the length the tokenizer was made with (the question's)."""
  tok = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=12)
  text = "is the spleen of normal size on this axial ct scan of the abdomen"
  whole = tok.hf(text)["input_ids"]
  assert len(whole) > 12
  for n in (4, 12, 32):
    batch = tok([text], max_len=n)
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (1, n)
    kept = min(n, len(whole))
    assert batch["attention_mask"][0].sum() == kept
    assert batch["input_ids"][0][:kept - 1].tolist() == whole[:kept - 1]  # Its first pieces,
    assert batch["input_ids"][0][kept - 1] == whole[-1]                    # then [SEP].
  assert tok([text])["input_ids"].shape == (1, 12)


def test_errors_name_the_problem(tmp_path):
  with pytest.raises(FileNotFoundError, match="no tokenizer vocabulary in"):
    Tokenizer.from_folder(tmp_path, max_len=8)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    Tokenizer.from_folder(tmp_path / "missing", max_len=8)
  with pytest.raises(ValueError, match="no tokenizer folder"):
    from_config({"tokenizer": None, "checkpoint": None, "max_len": 8})
  tok = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=8)
  with pytest.raises(TypeError, match="text 1 is a NoneType"):
    tok(["fine", None])


def test_an_open_clip_folder_without_tokenizer_files_does_not_read_the_working_folders(
    tmp_path, monkeypatch):
  """An open_clip config naming no tokenizer folder read the working folder's vocabulary
  (Path("") is "."), whatever it was."""
  import shutil
  folder = tmp_path / "oc"
  folder.mkdir()
  (folder / "open_clip_config.json").write_text(json.dumps(
      {"model_cfg": {"embed_dim": 32, "text_cfg": {"hf_model_name": "x/y"}}}))
  elsewhere = tmp_path / "elsewhere"
  shutil.copytree(ASSETS / "bert_uncased_vocab", elsewhere)
  monkeypatch.chdir(elsewhere)
  with pytest.raises(FileNotFoundError, match=rf"no tokenizer vocabulary in .*{folder}"):
    Tokenizer.from_folder(folder, max_len=8)


def test_named_class_equals_autotokenizer_and_leaves_torch_unimported(minilm_dir):
  """Folders whose tokenizer_config.json names a class load through that class: the same
  tokens as AutoTokenizer, without AutoTokenizer's import of torch (seconds of start-up for
  every run on a machine where torch is installed, as it is here)."""
  import transformers
  texts = TEXTS + ["What organ is shown, and is it abnormal?"]
  for folder in (minilm_dir, ASSETS / "bert_uncased_vocab"):
    ours = Tokenizer.from_folder(folder, max_len=16)
    auto = Tokenizer(transformers.AutoTokenizer.from_pretrained(str(folder)), max_len=16)
    for key, value in auto(texts).items():
      np.testing.assert_array_equal(ours(texts)[key], value, err_msg=f"{folder} {key}")
  code = ("import sys; from medvqa_jax.data.tokenizer import Tokenizer; "
          f"t = Tokenizer.from_folder({str(minilm_dir)!r}, max_len=8); t(['a test']); "
          "print('torch' in sys.modules)")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip() == "False"


@pytest.mark.parametrize("which", ["bundled BERT", "MiniLM", "CLIP BPE"])
def test_saved_tokenizer_reads_back_the_same(which, minilm_dir, clip_bpe_folder, tmp_path):
  """A run keeps a copy of its tokenizer (Tokenizer.save): the copy tokenizes as the original
  did, and saving over an old copy replaces it whole."""
  folder = {"bundled BERT": ASSETS / "bert_uncased_vocab", "MiniLM": minilm_dir,
            "CLIP BPE": clip_bpe_folder}[which]
  original = Tokenizer.from_folder(folder, max_len=16)
  (tmp_path / "copy").mkdir()
  (tmp_path / "copy" / "stale.txt").write_text("from an earlier save")
  original.save(tmp_path / "copy")
  assert not (tmp_path / "copy" / "stale.txt").exists()
  assert [p.name for p in tmp_path.iterdir()] == ["copy"]  # No temporary folder left.
  copy = Tokenizer.from_folder(tmp_path / "copy", max_len=16)
  for key, value in original(TEXTS).items():
    np.testing.assert_array_equal(copy(TEXTS)[key], value, err_msg=key)


def test_a_folder_asking_for_left_padding_and_truncation_gets_right(tmp_path):
  # The models read masks as lengths and a long question must keep its beginning, whatever
  # a checkpoint's tokenizer_config.json says.
  folder = tmp_path / "left"
  Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=8).save(folder)
  config = json.loads((folder / "tokenizer_config.json").read_text())
  config.update(padding_side="left", truncation_side="left")
  (folder / "tokenizer_config.json").write_text(json.dumps(config))
  tok = Tokenizer.from_folder(folder, max_len=8)
  right = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=8)
  texts = ["is the left femur broken near the knee joint", "no"]
  for key, value in right(texts).items():
    np.testing.assert_array_equal(tok(texts)[key], value, err_msg=key)
  assert tok.hf.decode(tok(texts)["input_ids"][0]).startswith("[CLS] is the left")


def test_a_tokenizer_with_ids_past_the_towers_table_is_refused(tmp_path):
  """The bundled uncased vocabulary (30,522 ids) read by a tower of Bio_ClinicalBERT's cased
  table (28,996 rows): the ids past the table embed as NaN, with no error. Refused; so is a
  CLIP vocab.json naming its special tokens as open_clip does (the tokenizer appends
  OpenAI's two, ids 49408 and 49409, past a 49,408-row table)."""
  import jax
  from open_clip.tokenizer import SimpleTokenizer

  from medvqa_jax.data.tokenizer import check_fits
  from medvqa_jax.models import bert, clip_text
  tok = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", 16)
  cased = bert.BertEncoder(vocab_size=28996, width=16, depth=1, num_heads=2, mlp_dim=32,
                           max_positions=16)
  ids = tok(["is there airspace consolidation on the left side"])
  assert ids["input_ids"].max() >= 28996
  params = cased.init(jax.random.PRNGKey(0), ids["input_ids"], ids["attention_mask"])
  out = cased.apply(params, ids["input_ids"], ids["attention_mask"])
  assert np.isnan(np.asarray(out["pooled"])).any()  # What the check prevents.
  with pytest.raises(ValueError, match=r"the tokenizer of model.text has 30522 token ids, but "
                                       r"the text tower's embedding table has 28996 rows"):
    check_fits(tok, {"text tower": cased, "decoder": None})
  check_fits(tok, {"text tower": bert.BertEncoder(), "decoder": None})  # 30,522 rows: fits.
  # Sequences as long as the position table fit; one token more does not.
  at_most = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", 16)
  check_fits(at_most, {"text tower": cased.clone(vocab_size=30522)})
  longer = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", 17)
  with pytest.raises(ValueError, match=r"model.text.max_len=17: the text tower reads at most "
                                       r"16 tokens"):
    check_fits(longer, {"text tower": cased.clone(vocab_size=30522)})
  with pytest.raises(ValueError, match=r"has 30522 token ids, but the text tower's embedding "
                                       r"table has 30521 rows"):  # One id past it.
    check_fits(tok, {"text tower": bert.BertEncoder(vocab_size=30521)})

  folder = tmp_path / "clip"
  folder.mkdir()
  ref = SimpleTokenizer()
  (folder / "vocab.json").write_text(json.dumps(ref.encoder))
  merges = sorted(ref.bpe_ranks, key=ref.bpe_ranks.get)
  (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges))
  clip = Tokenizer.from_folder(folder, 16)
  assert clip.vocab_size == 49410
  with pytest.raises(ValueError, match=r"49410 token ids, but the teacher's text tower's "
                                       r"embedding table has 49408 rows"):
    check_fits(clip, {"teacher's text tower": clip_text.ClipTextTransformer()}, "teacher.text")


def test_a_missing_tokenizer_folder_is_named_by_its_flag(tmp_path):
  """The error names the config field that gave the folder (train.py said only "tokenizer
  folder ... does not exist")."""
  import ml_collections

  from medvqa_jax.data.tokenizer import from_config
  for field in ("tokenizer", "checkpoint"):
    cfg = ml_collections.ConfigDict(dict(tokenizer=None, checkpoint=None, max_len=8))
    cfg[field] = str(tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match=rf"^--config.teacher.text.{field}="
                                                rf"{tmp_path / 'absent'}: tokenizer folder "):
      from_config(cfg, "teacher.text")
  empty = ml_collections.ConfigDict(dict(tokenizer=str(tmp_path), checkpoint=None, max_len=8))
  with pytest.raises(FileNotFoundError, match=rf"^--config.model.text.tokenizer={tmp_path}: "
                                              "no tokenizer vocabulary in"):
    from_config(empty)


def test_a_tokenizer_folder_missing_its_vocabulary_or_special_tokens_is_refused(tmp_path):
  """A run's tokenizer copy missing tokenizer.json loaded as 5 ids (every word [UNK]) and
  predict.py answered on that, silently; one missing tokenizer_config.json failed at the first
  batch in transformers ("Asking to pad...")."""
  import shutil

  from medvqa_jax import ASSETS
  from medvqa_jax.data.tokenizer import Tokenizer
  Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", 16).save(tmp_path / "whole")
  no_vocab = shutil.copytree(tmp_path / "whole", tmp_path / "no_vocab")
  (no_vocab / "tokenizer.json").unlink()
  with pytest.raises(FileNotFoundError, match=rf"no tokenizer vocabulary in {no_vocab}: "
                     r"expected tokenizer.json, .* found \['tokenizer_config.json'\]"):
    Tokenizer.from_folder(no_vocab, 16)
  no_config = shutil.copytree(tmp_path / "whole", tmp_path / "no_config")
  (no_config / "tokenizer_config.json").unlink()
  with pytest.raises(ValueError, match=rf"the tokenizer in {no_config} has no padding token"):
    Tokenizer.from_folder(no_config, 16)
  sentencepiece = tmp_path / "sentencepiece"  # A model alone: no class to read it with.
  sentencepiece.mkdir()
  (sentencepiece / "spiece.model").write_bytes(b"x")
  with pytest.raises(FileNotFoundError, match=rf"no tokenizer vocabulary in {sentencepiece}"):
    Tokenizer.from_folder(sentencepiece, 16)
  cut = shutil.copytree(tmp_path / "whole", tmp_path / "cut")
  (cut / "tokenizer.json").write_text((cut / "tokenizer.json").read_text()[:1000])
  with pytest.raises(ValueError, match=rf"the tokenizer files in {cut} cannot be read"):
    Tokenizer.from_folder(cut, 16)


def test_a_runs_tokenizer_copy_is_checked_against_its_record(tmp_path):
  from types import SimpleNamespace

  from medvqa_jax import ASSETS
  from medvqa_jax.data.tokenizer import Tokenizer
  from medvqa_jax.train import checkpoint as ckpt_lib
  tokenizer = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", 16)
  tokenizer.save(tmp_path / ckpt_lib.TOKENIZER)
  record, text = {"tokenizer": tokenizer.fingerprint()}, SimpleNamespace(max_len=16)
  got = ckpt_lib.run_tokenizer(tmp_path, text, record)
  assert got.fingerprint() == record["tokenizer"]  # A copy saved and read back is the same.
  assert ckpt_lib.run_tokenizer(tmp_path, text, {}) is not None  # Older records: unchecked.
  copy = tmp_path / ckpt_lib.TOKENIZER  # Its vocabulary replaced: other ids for the same text.
  (copy / "tokenizer.json").unlink()
  (copy / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]",
                                             "is", "there"]) + "\n")
  with pytest.raises(ValueError, match=rf"{copy}: this is not the tokenizer the run was "
                     r"trained with \(its fingerprint is \w+, the run recorded "
                     rf"{record['tokenizer']}\)"):
    ckpt_lib.run_tokenizer(tmp_path, text, record)
  # Files that cannot be read, or none left: the same advice.
  (copy / "vocab.txt").write_text("")
  (copy / "tokenizer.json").write_text("{")
  with pytest.raises(ValueError, match=rf"the tokenizer files in {copy} cannot be read .*: the "
                     r"run's copy of its tokenizer is damaged; copy its files again from where "
                     r"the run was made"):
    ckpt_lib.run_tokenizer(tmp_path, text, record)
  for f in copy.iterdir():
    f.unlink()
  with pytest.raises(ValueError, match=rf"no tokenizer vocabulary in {copy}.*: the run's copy"):
    ckpt_lib.run_tokenizer(tmp_path, text, record)


def test_the_fingerprint_holds_what_maps_text_to_ids_and_no_call_state(tmp_path):
  """Another normalisation (here cased: other ids for "CT Scan") is another fingerprint,
  though the vocabulary is the same; a call (which leaves the fast tokenizer's truncation
  and padding state set) changes nothing of it."""
  tok = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", 16)
  before = tok.fingerprint()
  tok(["a question of some words"], max_len=5)
  assert tok.fingerprint() == before
  tok.save(tmp_path / "cased")
  spec = json.loads((tmp_path / "cased" / "tokenizer.json").read_text())
  assert spec["normalizer"]["lowercase"] is True
  spec["normalizer"]["lowercase"] = False
  (tmp_path / "cased" / "tokenizer.json").write_text(json.dumps(spec))
  settings = json.loads((tmp_path / "cased" / "tokenizer_config.json").read_text())
  settings["do_lower_case"] = False
  (tmp_path / "cased" / "tokenizer_config.json").write_text(json.dumps(settings))
  cased = Tokenizer.from_folder(tmp_path / "cased", 16)
  assert cased.hf.get_vocab() == tok.hf.get_vocab()
  assert cased(["CT Scan"])["input_ids"].tolist() != tok(["CT Scan"])["input_ids"].tolist()
  assert cased.fingerprint() != before
