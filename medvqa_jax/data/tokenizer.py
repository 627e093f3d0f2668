"""Tokenizers from local checkpoint folders (CLIP BPE, BERT WordPiece), through transformers.

No torch is needed: transformers' tokenizers run on the `tokenizers` library alone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from medvqa_jax import files as files_lib
from medvqa_jax.errors import first_line


def _tokenizer_folder(folder: Path) -> Path:
  """An open_clip folder may name its tokenizer's folder in open_clip_config.json."""
  cfg_path = folder / "open_clip_config.json"
  if cfg_path.exists():
    cfg = json.loads(cfg_path.read_text())
    cfg = cfg.get("model_cfg", cfg).get("text_cfg", {})
    # (None or "": no folder named; Path("") is the working folder, which was taken.)
    named = cfg.get("hf_tokenizer_name")
    if named and not any((folder / f).exists()
                         for f in ("tokenizer.json", "vocab.txt", "vocab.json")) \
        and Path(named).is_dir():
      return Path(named)
  return folder


def _named_class(config_path: Path):
  """The transformers tokenizer class named by a tokenizer_config.json, or None."""
  import transformers
  if not config_path.exists():
    return None
  name = json.loads(config_path.read_text()).get("tokenizer_class")
  cls = getattr(transformers, name, None) if isinstance(name, str) else None
  return cls if isinstance(cls, type) and hasattr(cls, "from_pretrained") else None


def load_hf_tokenizer(folder: str | os.PathLike):
  """A transformers tokenizer from a folder, with fallbacks for folders that hold only
  vocabulary files: `vocab.txt` (BERT WordPiece) or `vocab.json` + `merges.txt` (CLIP BPE).
  A folder without its vocabulary (tokenizer_config.json alone gave a tokenizer of 5 ids,
  every word [UNK]), files that cannot be read, or a tokenizer without a padding token are
  refused, naming the folder."""
  import transformers
  folder = _tokenizer_folder(Path(folder))
  if not folder.is_dir():
    raise FileNotFoundError(f"tokenizer folder {folder} does not exist")
  has = lambda *names: all((folder / n).exists() for n in names)
  found = sorted(p.name for p in folder.iterdir())
  # (A SentencePiece model needs the tokenizer_config.json that names its class.)
  vocabulary = (has("tokenizer.json") or has("vocab.txt") or has("vocab.json", "merges.txt")
                or (has("tokenizer_config.json") and any(n.endswith(".model") for n in found)))
  if not vocabulary:
    raise FileNotFoundError(
        f"no tokenizer vocabulary in {folder}: expected tokenizer.json, vocab.txt (BERT) or "
        f"vocab.json + merges.txt (CLIP); found {found}")
  try:
    if has("tokenizer.json") or has("tokenizer_config.json"):
      # The class the folder names, when transformers has it: AutoTokenizer would read the
      # model config through a module that imports torch (seconds of start-up) if installed.
      named = _named_class(folder / "tokenizer_config.json")
      if named is not None:
        hf = named.from_pretrained(str(folder), local_files_only=True)
      else:
        hf = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    elif has("vocab.json", "merges.txt"):
      hf = transformers.CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
    else:
      hf = transformers.BertTokenizer.from_pretrained(str(folder), local_files_only=True)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise ValueError(f"the tokenizer files in {folder} cannot be read ({type(e).__name__}: "
                     f"{first_line(e)}); found {found}") from None
  if hf.pad_token_id is None:  # (Its special tokens are in tokenizer_config.json.)
    raise ValueError(f"the tokenizer in {folder} has no padding token: is its "
                     f"tokenizer_config.json (or special_tokens_map.json) missing? found {found}")
  return hf


class Tokenizer:
  """Texts to fixed-length int32 arrays: input_ids, attention_mask, token_type_ids.

  Sequences are truncated to `max_len` (special tokens kept) and right-padded.
  """

  def __init__(self, hf_tokenizer, max_len: int):
    self.hf = hf_tokenizer
    # Whatever the folder's tokenizer_config says: the models take masks as lengths, and a
    # question too long keeps its beginning.
    self.hf.padding_side = "right"
    self.hf.truncation_side = "right"
    self.max_len = max_len

  @classmethod
  def from_folder(cls, folder: str | os.PathLike, max_len: int):
    return cls(load_hf_tokenizer(folder), max_len)

  def save(self, folder: str | os.PathLike):
    """Writes the tokenizer's files to `folder` (`from_folder` reads them back): written
    beside it and renamed, so the folder is never half-written; an old one is replaced."""
    folder = Path(folder)
    tmp = files_lib.temporary(folder)
    shutil.rmtree(tmp, ignore_errors=True)
    self.hf.save_pretrained(str(tmp))
    if folder.exists():
      shutil.rmtree(folder)
    os.replace(tmp, folder)

  def with_max_len(self, max_len: int) -> "Tokenizer":
    """A tokenizer of other-length sequences with its own copy of the HF tokenizer: a fast
    tokenizer keeps its truncation length as state, so two lengths sharing one instance race
    when the input pipeline's threads call them concurrently."""
    return Tokenizer(copy.deepcopy(self.hf), max_len)

  def fingerprint(self) -> str:
    """A digest of what maps text to token ids: the vocabulary, normalisation,
    pre-tokenisation, merges and special tokens (not the call-time truncation and padding
    state a fast tokenizer keeps)."""
    backend = getattr(self.hf, "backend_tokenizer", None)
    if backend is not None:
      spec = json.loads(backend.to_str())
      spec.pop("truncation", None), spec.pop("padding", None)
    else:
      spec = {"class": type(self.hf).__name__, "vocab": sorted(self.hf.get_vocab().items()),
              "lower": getattr(self.hf, "do_lower_case", None)}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]

  @property
  def vocab_size(self) -> int:
    return len(self.hf)

  def __call__(self, texts: str | list[str], max_len: int | None = None) -> dict[str, np.ndarray]:
    texts = [texts] if isinstance(texts, str) else list(texts)
    for i, t in enumerate(texts):
      if not isinstance(t, str):
        raise TypeError(f"text {i} is a {type(t).__name__}, not a string: {t!r}")
    enc = self.hf(texts, max_length=max_len or self.max_len, padding="max_length",
                  truncation=True, return_tensors="np", return_token_type_ids=True)
    return {k: np.asarray(enc[k], np.int32)
            for k in ("input_ids", "attention_mask", "token_type_ids")}


def positions(tower) -> int | None:
  """How many tokens a text module reads (a BERT's max_positions, a CLIP text transformer's
  context_length); None for another module."""
  return getattr(tower, "max_positions", None) or getattr(tower, "context_length", None)


def check_fits(tokenizer: Tokenizer, towers: dict, where: str = "model.text") -> None:
  """Refuses a tokenizer whose ids run past the embedding table of a tower that reads them
  (`towers`: name -> module with `vocab_size`; None skipped): an id past the table embeds as
  NaN, with no error, e.g. an uncased vocabulary given to a cased tower. The first of
  `towers` reads the tokenizer's sequences: refused too when they are longer than its
  position embeddings (`where`.max_len is named, before anything runs)."""
  first = next(iter(towers.values()), None)
  if positions(first) and tokenizer.max_len > positions(first):
    name = next(iter(towers))
    raise ValueError(f"{where}.max_len={tokenizer.max_len}: the {name} reads at most "
                     f"{positions(first)} tokens (its position embeddings); lower "
                     f"--config.{where}.max_len")
  for name, tower in towers.items():
    rows = getattr(tower, "vocab_size", None)
    if rows is not None and tokenizer.vocab_size > rows:
      raise ValueError(
          f"the tokenizer of {where} has {tokenizer.vocab_size} token ids, but the {name}'s "
          f"embedding table has {rows} rows: the ids past it would embed as NaN; is "
          f"{where}.tokenizer the tokenizer this tower was trained with?")


def from_config(cfg, where: str = "model.text") -> Tokenizer:
  """The tokenizer of a text tower config (at `where` in the config): `tokenizer` folder,
  else the checkpoint folder."""
  field = "tokenizer" if cfg.get("tokenizer") else "checkpoint"
  folder = cfg.get(field)
  if not folder:
    raise ValueError(f"the text tower has no tokenizer folder: set --config.{where}.tokenizer="
                     f"/path (or --config.{where}.checkpoint=/path for a checkpoint that ships "
                     "one)")
  try:
    return Tokenizer.from_folder(folder, cfg.max_len)
  except FileNotFoundError as e:  # Named by the flag that gave the folder.
    raise FileNotFoundError(f"--config.{where}.{field}={folder}: {e}") from None
