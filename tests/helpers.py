"""Helpers shared by the tests."""

import contextlib
import json
import os
import socket
import subprocess
from pathlib import Path

import numpy as np


def padded_ids(rng, lengths, max_len, vocab, first=None, last=None):
  """Random token ids (0 = pad) with `first`/`last` special ids, and the attention mask."""
  ids = np.zeros((len(lengths), max_len), np.int64)
  for i, n in enumerate(lengths):
    ids[i, :n] = rng.integers(1, vocab - 3, n)
    if first is not None:
      ids[i, 0] = first
    if last is not None:
      ids[i, n - 1] = last
  mask = (np.arange(max_len)[None] < np.asarray(lengths)[:, None]).astype(np.int64)
  return ids, mask


def max_diff(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_params_close(got: dict, ref: dict, tol: float, bound: float):
  """Flat params of two runs of the same training on other device layouts: every array within
  `tol` (absolute, plus 1e-5 relative), but for one element in a thousand (at least one),
  which must stay within `bound` (the learning rates of the steps run). Adam moves an element
  whose gradient is near zero (e.g. a ReLU unit at its kink) by up to the learning rate
  whichever way rounding tips it, and rounding differs with each layout's reduction order. A
  shard left un-updated or updated twice is off in every element."""
  assert got.keys() == ref.keys()
  for k in ref:
    assert np.all(np.isfinite(got[k])), k
    diff = np.abs(np.asarray(got[k], np.float64) - np.asarray(ref[k], np.float64))
    off = diff > tol + 1e-5 * np.abs(ref[k])
    assert off.sum() <= max(1, off.size // 1000) and diff.max() <= bound, \
        (k, int(off.sum()), float(diff.max()))


def mha_float64(x, kv, p, key_mask):
  """Multi-head attention in NumPy float64 as written, every bias in place (the key bias
  included): x (B, Lq, D), kv (B, Lk, D), p a MultiHeadAttention's params, key_mask (B, Lk)."""
  q = np.einsum("bld,dhk->blhk", x, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bld,dhk->blhk", kv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bld,dhk->blhk", kv, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("bqhk,bphk->bhqp", q, k) / np.sqrt(q.shape[-1])
  logits = np.where(key_mask[:, None, None, :] == 1, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w = w / w.sum(-1, keepdims=True)
  out = np.einsum("bhqp,bphk->bqhk", w, v)
  return np.einsum("bqhk,hkd->bqd", out, p["out"]["kernel"]) + p["out"]["bias"]


def rel_err(a, b):
  """||a - b|| / ||b||, in float64."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def count_calls(monkeypatch, owner, name: str) -> list:
  """Wraps `owner.name` (for the rest of the test) to record each call's arguments; returns
  the list they are appended to."""
  calls, inner = [], getattr(owner, name)

  def wrapper(*args, **kwargs):
    calls.append((args, kwargs))
    return inner(*args, **kwargs)

  monkeypatch.setattr(owner, name, wrapper)
  return calls


def unwritable(monkeypatch, folder) -> None:
  """`folder` reads as not writable to os.access (for the rest of the test, or of a
  `monkeypatch.context()`): the tests may run as root, whom no mode stops."""
  real, folder = os.access, Path(folder)
  monkeypatch.setattr(os, "access", lambda path, mode, *a, **k: (
      not (Path(path) == folder and mode & os.W_OK) and real(path, mode, *a, **k)))


# Python code that makes torch unimportable in a subprocess, as on a machine without it.
HIDE_TORCH = """
import sys
class _HideTorch:
  def __init__(self, inner): self.inner = inner
  def find_spec(self, name, path=None, target=None):
    if name.split(".")[0] in ("torch", "torchvision"): return None
    return self.inner.find_spec(name, path, target)
  def __getattr__(self, attr): return getattr(self.inner, attr)
sys.meta_path[:] = [_HideTorch(f) for f in sys.meta_path]
"""


def sample_caption_rows() -> list[dict]:
  """A caption corpus's rows over the bundled sample images (captions: their questions)."""
  from medvqa_jax import ASSETS
  samples = json.loads((ASSETS / "demo" / "samples.json").read_text())
  return [{"id": f"rad-{s['qid']}", "image": str(ASSETS / "demo" / "images" / s["image"]),
           "caption": s["question"]} for s in samples]


def xla_flags(devices: int) -> str:
  """XLA_FLAGS for a process with `devices` CPU devices: the suite's own (conftest.py), and
  the device count."""
  return (f"{os.environ.get('XLA_FLAGS', '')} "
          f"--xla_force_host_platform_device_count={devices}").strip()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def start_two_processes(cmd: list[str], env: dict, cwd) -> list[subprocess.Popen]:
  """Starts `cmd` (a command taking launch/common.py's cluster flags) as the two processes
  of one multi-host run, joined on a free local port."""
  cmd = cmd + [f"--coordinator_address=localhost:{free_port()}", "--num_processes=2"]
  return [subprocess.Popen(cmd + [f"--process_id={i}"], cwd=cwd, env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]


@contextlib.contextmanager
def reaped(procs):
  """Kills those of the subprocesses `procs` still running when the block ends: a failed or
  timed-out check left them running, holding the CPU the later tests run on."""
  try:
    yield
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def write_jsonl(path, rows):
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  return path


def tiny_config():
  """The demo config's model at the sizes the model tests use (32 px images, 30-token
  questions, a 64-token prior, 4 ranked candidates): small and quick to compile."""
  from configs import demo
  config = demo.get_config()
  config.model.image.arch.image_size = 32
  config.model.text.max_len = 30
  config.model.update(prior_max_tokens=64, rank_k=4)
  return config


def demo_part(folder: Path, train: int = 600, test: int = 90) -> Path:
  """The first `train` and `test` questions of the bundled VQA-RAD copy (the demo's data,
  3,064 and 451), written to `folder` as a source folder (data.source_dir; its images linked,
  not copied). The training-loop tests run the demo's code paths on it: each of their runs
  answered the 451 test questions, re-ranking up to 37 candidates each, which dominated."""
  from medvqa_jax import ASSETS
  source = ASSETS / "vqa_rad_sample"
  folder.mkdir(parents=True, exist_ok=True)
  for name, n in (("trainset.json", train), ("testset.json", test)):
    (folder / name).write_text(json.dumps(json.loads((source / name).read_text())[:n]))
  (folder / "images").symlink_to(source / "images", target_is_directory=True)
  return folder


SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def benchmark_script(name: str):
  """benchmarks/<name>.py loaded as a module (its main() and helpers, called in-process)."""
  import importlib.util
  path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def shared_data() -> Path:
  """../shared/data, the real datasets (CI has them at the same path). Tests that read them
  fail, rather than skip, where the folder is missing: a skipped test would count as passing."""
  import pytest
  if not SHARED_DATA.is_dir():
    pytest.fail(f"the real data is missing: expected it in {SHARED_DATA} (../shared/data "
                "beside the repository, as CI has it)")
  return SHARED_DATA


def dot_precisions(fn, *args) -> list:
  """The precision of every dot product (einsum, matmul) in `fn(*args)`'s program, sub-programs
  (scan, while, jit) included."""
  import jax
  found = []

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "dot_general":
        found.append(eqn.params["precision"])
      for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else (value,):
          if hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):  # A ClosedJaxpr.
            walk(sub.jaxpr)
          elif hasattr(sub, "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return found
