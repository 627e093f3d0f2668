"""Reading PyTorch-format checkpoints as NumPy and writing them strictly into Flax params.

Every importer describes its checkpoint as a `Mapping`: for each Flax parameter path, the
checkpoint key(s) that feed it and the transform (transpose, reshape, resize). `assemble`
then checks the mapping against the module's parameter shapes and the checkpoint's keys:
a missing key, an unused key or a shape mismatch is an error that lists them all, unless
the caller named the parameters as freshly initialised or the keys as deliberately unused.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import jax
import numpy as np

from medvqa_jax.errors import first_line

log = logging.getLogger(__name__)

# Weight files looked for in a checkpoint folder, best first.
WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "open_clip_model.safetensors",
    "pytorch_model.bin", "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin",
)
# open_clip's own files first: a hub folder of an open_clip model may also hold a
# transformers export of it (model.safetensors), whose keys are another format's.
_OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_LFS_POINTER = b"version https://git-lfs"


class CheckpointError(ValueError):
  """A checkpoint does not fit the model it is loaded into."""


def find_weights(folder: str | os.PathLike, source: str | None = None) -> Path:
  """The weight file of a checkpoint folder (a file is itself), looked for in the order of
  `source`'s format ("open_clip": its own file names first)."""
  folder = Path(folder)
  if folder.is_file():
    return folder
  if not folder.is_dir():
    raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
  names = WEIGHT_FILES
  if source == "open_clip":
    names = _OPEN_CLIP_FILES + tuple(n for n in WEIGHT_FILES if n not in _OPEN_CLIP_FILES)
  for name in names:
    if (folder / name).exists():
      return folder / name
  raise FileNotFoundError(
      f"no weights in {folder}: expected one of {', '.join(names)}; "
      f"found {sorted(p.name for p in folder.iterdir())}")


def _torch_load(path: Path) -> dict[str, np.ndarray]:
  try:
    import torch  # Only for PyTorch pickles; safetensors need no torch.
  except ImportError:
    raise ImportError(
        f"{path} is a PyTorch pickle and reading it needs torch, which is not installed. "
        "Install torch (e.g. `pip install torch`), or convert the checkpoint to safetensors "
        "once where torch is available.") from None
  obj = torch.load(path, map_location="cpu", weights_only=True)
  if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
    obj = obj["state_dict"]
  out = {}
  for k, v in obj.items():
    if not hasattr(v, "detach"):
      continue  # Non-tensor entries (epoch counters and the like) are no weights.
    v = v.detach()
    if v.is_floating_point():
      v = v.float()
    out[k.removeprefix("module.")] = v.numpy()
  return out


def _safetensors_load(path: Path) -> dict[str, np.ndarray]:
  from safetensors import safe_open
  out = {}
  # The "flax" framework reads bfloat16 too; values are copied to host float32 NumPy.
  with safe_open(str(path), framework="flax") as f:
    for k in f.keys():
      v = np.asarray(f.get_tensor(k))
      out[k] = v.astype(np.float32) if v.dtype.kind == "f" or v.dtype.name == "bfloat16" else v
  return out


_shared: dict | None = None  # Reads kept for reuse inside `shared_reads()`.


@contextlib.contextmanager
def shared_reads():
  """Inside the block each checkpoint file is read once: later reads of the same, unchanged
  file (a CLIP checkpoint holding both towers and the teacher's logit scale, a text
  checkpoint that also seeds the decoder) reuse the first read's arrays, which callers must
  not modify. They are released when the outermost block ends."""
  global _shared
  outer = _shared is not None
  if not outer:
    _shared = {}
  try:
    yield
  finally:
    if not outer:
      _shared = None


def read_state_dict(path: str | os.PathLike, source: str | None = None
                    ) -> dict[str, np.ndarray]:
  """Reads a checkpoint file or folder (safetensors, sharded index, or PyTorch pickle; a
  folder's file as `find_weights` picks it for `source`); inside `shared_reads()` an unchanged
  file is read once."""
  path = find_weights(path, source)
  if _shared is None:
    return _read(path)
  stat = path.stat()
  key = (str(path.resolve()), stat.st_ino, stat.st_mtime_ns, stat.st_size)
  if key not in _shared:
    _shared[key] = _read(path)
  return dict(_shared[key])


def _read(path: Path) -> dict[str, np.ndarray]:
  if path.name.endswith(".index.json"):
    with _reading(path, "a sharded checkpoint's index (JSON with a weight_map)"):
      shards = sorted(set(json.loads(path.read_text())["weight_map"].values()))
    out = {}
    for shard in shards:
      out.update(_read(path.parent / shard))
    return out
  if path.suffix == ".safetensors":
    with _reading(path, "safetensors"):
      return _safetensors_load(path)
  if path.suffix in (".bin", ".pt", ".pth"):
    with _reading(path, "a PyTorch state dict"):
      return _torch_load(path)
  raise CheckpointError(f"unknown checkpoint format: {path}")


@contextlib.contextmanager
def _reading(path: Path, kind: str):
  """A file that cannot be read as `kind` (cut short, damaged, a Git LFS pointer left by a
  clone without git-lfs, a whole pickled model) as a CheckpointError naming it; the readers'
  own errors name no file, and torch's suggests unpickling with weights_only=False."""
  try:
    yield
  except (FileNotFoundError, ImportError, PermissionError, MemoryError):
    raise
  except Exception as e:
    if "RESOURCE_EXHAUSTED" in str(e) or "out of memory" in str(e).lower():
      raise  # Too large for this machine's memory: nothing is wrong with the file.
    try:
      size = path.stat().st_size
      with open(path, "rb") as f:
        pointer = f.read(len(_LFS_POINTER)) == _LFS_POINTER
    except OSError:
      size, pointer = None, False
    if pointer:
      raise CheckpointError(
          f"{path} is a Git LFS pointer ({size} bytes), not the weights: fetch them with "
          "`git lfs pull` in that repository (or download the file itself)") from None
    if isinstance(e, pickle.UnpicklingError):
      raise CheckpointError(
          f"{path} holds more than tensors (a whole pickled model, or other objects): only "
          "a state dict of tensors is read, for safety (code in a pickle would run); save "
          "the model's state_dict() (or safetensors) instead") from None
    raise CheckpointError(
        f"{path} ({size} bytes) cannot be read as {kind} ({type(e).__name__}: "
        f"{first_line(e)}): the file is damaged, cut short or of another kind") from None


def rename_legacy_keys(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """Old BERT checkpoints (converted from TensorFlow) name LayerNorm parameters gamma/beta."""
  def rename(k):
    if k.endswith("LayerNorm.gamma"):
      return k[:-len("gamma")] + "weight"
    if k.endswith("LayerNorm.beta"):
      return k[:-len("beta")] + "bias"
    return k
  return {rename(k): v for k, v in state.items()}


# ---- transforms from PyTorch layouts to Flax layouts -------------------------------------

def linear(w):
  """torch Linear weight (out, in) -> Dense kernel (in, out)."""
  return np.asarray(w).T


def heads_in(num_heads: int):
  """torch Linear weight (H*hd, in) -> DenseGeneral kernel (in, H, hd); bias -> (H, hd)."""
  def f(w):
    w = np.asarray(w)
    if w.ndim == 1:
      return w.reshape(num_heads, -1)
    return w.T.reshape(w.shape[1], num_heads, -1)
  return f


def heads_out(num_heads: int):
  """torch Linear weight (out, H*hd) -> DenseGeneral kernel (H, hd, out)."""
  return lambda w: np.asarray(w).T.reshape(num_heads, -1, w.shape[0])


def conv(w):
  """torch Conv2d weight (out, in, kh, kw) -> Flax Conv kernel (kh, kw, in, out)."""
  return np.asarray(w).transpose(2, 3, 1, 0)


def identity(w):
  return np.asarray(w)


@dataclasses.dataclass
class Entry:
  keys: tuple[str, ...]
  fn: Callable[..., np.ndarray] = identity


class Mapping:
  """Flax parameter path ("block_0/attn/query/kernel") -> checkpoint key(s) + transform."""

  def __init__(self):
    self.entries: dict[str, Entry] = {}

  def add(self, path: str, key: str | Sequence[str], fn: Callable = identity):
    keys = (key,) if isinstance(key, str) else tuple(key)
    self.entries[path] = Entry(keys, fn)

  def dense(self, path: str, prefix: str, bias: bool = True):
    self.add(f"{path}/kernel", f"{prefix}.weight", linear)
    if bias:
      self.add(f"{path}/bias", f"{prefix}.bias")

  def layernorm(self, path: str, prefix: str):
    self.add(f"{path}/scale", f"{prefix}.weight")
    self.add(f"{path}/bias", f"{prefix}.bias")

  def attention(self, path: str, q: str, k: str, v: str, out: str, num_heads: int):
    for name, prefix in (("query", q), ("key", k), ("value", v)):
      self.add(f"{path}/{name}/kernel", f"{prefix}.weight", heads_in(num_heads))
      self.add(f"{path}/{name}/bias", f"{prefix}.bias", heads_in(num_heads))
    self.add(f"{path}/out/kernel", f"{out}.weight", heads_out(num_heads))
    self.add(f"{path}/out/bias", f"{out}.bias")

  def fused_attention(self, path: str, qkv: str, out: str, num_heads: int):
    """timm's fused qkv (3*D, D) weight and (3*D,) bias, split into query/key/value."""
    for i, name in enumerate(("query", "key", "value")):
      part = lambda w, i=i: np.split(np.asarray(w), 3, axis=0)[i]
      self.add(f"{path}/{name}/kernel", f"{qkv}.weight",
               lambda w, part=part: heads_in(num_heads)(part(w)))
      self.add(f"{path}/{name}/bias", f"{qkv}.bias",
               lambda w, part=part: heads_in(num_heads)(part(w)))
    self.add(f"{path}/out/kernel", f"{out}.weight", heads_out(num_heads))
    self.add(f"{path}/out/bias", f"{out}.bias")


def _key(k) -> str:
  """A path entry's name: a dict key, a sequence index, or an attribute (a named tuple's field,
  e.g. in an optimizer state) alike, as a checkpoint's metadata names them."""
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def flatten(tree) -> dict[str, Any]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key(k) for k in path): v for path, v in flat}


def unflatten(flat: dict[str, Any]) -> dict:
  tree: dict = {}
  for path, v in flat.items():
    node = tree
    *parents, leaf = path.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def _matches(patterns: Iterable[str], s: str) -> bool:
  return any(re.fullmatch(p, s) for p in patterns)


def _listing(items: Sequence[str], limit: int = 40) -> str:
  items = sorted(items)
  shown = "\n  ".join(items[:limit])
  more = f"\n  ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"\n  {shown}{more}"


def assemble(state: dict[str, np.ndarray], mapping: Mapping, template, *, source: str,
             owned: Callable[[str], bool] = lambda k: True, unused: Sequence[str] = (),
             fresh: Sequence[str] = (), init: Callable[[], Any] | None = None) -> dict:
  """Builds a params tree shaped like `template` from checkpoint `state`.

  owned:  which checkpoint keys belong to the module being loaded (keys of other towers in
          the same file are not its concern).
  unused: regexes (full match) over owned checkpoint keys that are deliberately not loaded,
          e.g. a pre-training head; every other owned key must be consumed.
  fresh:  regexes (full match) over parameter paths that are freshly initialised by `init`
          instead of loaded; their checkpoint keys, if any, count as consumed.
  """
  shapes = flatten(template)
  values, missing, mismatched, consumed = {}, [], [], set()
  fresh_paths = [p for p in shapes if _matches(fresh, p)]
  for path, shape in shapes.items():
    entry = mapping.entries.get(path)
    if entry is not None:
      consumed.update(entry.keys)
    if path in fresh_paths:
      continue
    if entry is None:
      missing.append(f"{path} (no checkpoint key maps to it)")
      continue
    absent = [k for k in entry.keys if k not in state]
    if absent:
      missing.extend(f"{k} (for {path})" for k in absent)
      continue
    try:
      v = entry.fn(*(state[k] for k in entry.keys))
    except (ValueError, TypeError, IndexError) as e:  # A reshape or resize that cannot apply.
      mismatched.append(f"{', '.join(entry.keys)}: {e} (for {path}, {tuple(shape.shape)})")
      continue
    if tuple(v.shape) != tuple(shape.shape):
      mismatched.append(f"{', '.join(entry.keys)}: checkpoint gives {tuple(v.shape)}, "
                        f"{path} needs {tuple(shape.shape)}")
      continue
    values[path] = np.asarray(v, dtype=shape.dtype)
  unexpected = [k for k in state if owned(k) and k not in consumed and not _matches(unused, k)]
  errors, hints = [], []
  if missing:
    errors.append(f"missing keys:{_listing(missing)}")
    hints.append("If parameters are new on purpose (e.g. a new head), name them as fresh "
                 "(the tower config's `fresh`: regexes of parameter paths).")
  if unexpected:
    errors.append(f"unexpected keys:{_listing(unexpected)}")
    hints.append("Unexpected keys are weights the model has no place for: a checkpoint of "
                 "another architecture, or a head to leave out (the tower config's `unused`: "
                 "regexes of checkpoint keys).")
  if mismatched:
    errors.append(f"shape mismatches:{_listing(mismatched)}")
  if errors:
    raise CheckpointError(f"checkpoint {source} does not match the model; " +
                          "; ".join(errors) + "".join("\n" + h for h in hints))
  if fresh_paths:
    if init is None:
      raise CheckpointError(f"fresh parameters {fresh_paths} need an init function")
    init_flat = flatten(init())
    for p in fresh_paths:
      values[p] = np.asarray(init_flat[p])
    log.info("freshly initialised (not loaded from %s): %s", source, ", ".join(fresh_paths))
  skipped = sorted(k for k in state if owned(k) and k not in consumed)
  if skipped:
    log.info("deliberately not loaded from %s: %s", source, ", ".join(skipped))
  return unflatten(values)
