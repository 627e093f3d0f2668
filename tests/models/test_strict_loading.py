"""Strict loading: missing, extra and misshapen keys are errors that name them."""

import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from safetensors.numpy import save_file

import helpers
from helpers import HIDE_TORCH
from medvqa_jax.models import state_dict, towers
from medvqa_jax.models.state_dict import CheckpointError


def _edited_copy(folder, tmp_path, edit):
  """A copy of a safetensors checkpoint folder with its state dict edited."""
  state = state_dict.read_state_dict(folder)
  edit(state)
  out = tmp_path / "edited"
  out.mkdir()
  shutil.copy(folder / "config.json", out / "config.json")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, out / "model.safetensors")
  return out


def test_missing_key_is_named(hf_bert, tmp_path):
  key = "encoder.layer.1.attention.self.key.weight"
  folder = _edited_copy(hf_bert[1], tmp_path, lambda s: s.pop(key))
  with pytest.raises(CheckpointError, match="missing keys") as e:
    towers.load("text", "hf_bert", folder)
  assert key in str(e.value) and "layer_1/attn/key/kernel" in str(e.value)


def test_extra_key_is_named(hf_bert, tmp_path):
  key = "encoder.layer.0.attention.self.rotary.weight"
  folder = _edited_copy(hf_bert[1], tmp_path, lambda s: s.update({key: np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match="unexpected keys") as e:
    towers.load("text", "hf_bert", folder)
  assert key in str(e.value)
  # Named by the caller as deliberately unused, the same checkpoint loads.
  towers.load("text", "hf_bert", folder, unused=[r".*\.rotary\..*"])


def test_key_outside_the_format_is_named(hf_clip, tmp_path):
  folder = _edited_copy(hf_clip[1], tmp_path,
                        lambda s: s.update({"adapter.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match="adapter.weight"):
    towers.load("image", "hf_clip", folder)


def test_shape_mismatch_is_named(hf_clip, tmp_path):
  key = "vision_model.encoder.layers.0.mlp.fc1.bias"
  folder = _edited_copy(hf_clip[1], tmp_path, lambda s: s.update({key: s[key][:100]}))
  with pytest.raises(CheckpointError, match="shape mismatches") as e:
    towers.load("image", "hf_clip", folder)
  assert key in str(e.value)


def test_fresh_head_is_initialised_not_loaded(hf_clip, tmp_path):
  folder = _edited_copy(hf_clip[1], tmp_path, lambda s: s.pop("visual_projection.weight"))
  with pytest.raises(CheckpointError, match="visual_projection.weight"):
    towers.load("image", "hf_clip", folder)
  module, params = towers.load("image", "hf_clip", folder, fresh=["head/.*"], seed=3)
  _, full = towers.load("image", "hf_clip", hf_clip[1])
  kernel = np.asarray(params["head"]["proj"]["kernel"])
  assert kernel.shape == (64, 24) and np.std(kernel) > 0
  assert not np.allclose(kernel, full["head"]["proj"]["kernel"])
  same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)),
                      {k: v for k, v in params.items() if k != "head"},
                      {k: v for k, v in full.items() if k != "head"})
  assert all(jax.tree.leaves(same))


def test_kind_mismatch_and_missing_checkpoint_are_reported(hf_bert):
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(kind="clip_text", source="hf_bert",
                                       checkpoint=str(hf_bert[1]), arch={}, dtype="float32",
                                       fresh=()))
  with pytest.raises(ValueError, match="kind='clip_text'"):
    towers.from_config(cfg)
  cfg.checkpoint = ""
  with pytest.raises(ValueError, match="no folder is set"):
    towers.from_config(cfg)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    towers.load("text", "hf_bert", "/nonexistent/bert")


def test_pytorch_pickle_without_torch_says_so(hf_bert_pretraining):
  """With torch absent, a pytorch_model.bin is refused with a message that says why."""
  code = HIDE_TORCH + textwrap.dedent(f"""
      from medvqa_jax.models import towers
      try:
        towers.load("text", "hf_bert", {str(hf_bert_pretraining[1])!r})
      except ImportError as e:
        print("ERROR:", e)
      """)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
  assert "ERROR:" in out.stdout, out.stderr
  assert "pytorch_model.bin is a PyTorch pickle" in out.stdout
  assert "needs torch" in out.stdout


def test_shared_reads_read_each_unchanged_file_once(hf_bert, tmp_path, monkeypatch):
  """Inside `shared_reads` a file is read once (callers get their own dict over the same
  arrays); a rewritten file is read again; outside the block every call reads."""
  folder = _edited_copy(hf_bert[1], tmp_path, lambda state: None)
  reads = helpers.count_calls(monkeypatch, state_dict, "_read")
  with state_dict.shared_reads():
    first = state_dict.read_state_dict(folder)
    first.pop("embeddings.word_embeddings.weight")
    with state_dict.shared_reads():  # Nested blocks share the outer one's reads.
      second = state_dict.read_state_dict(folder / "model.safetensors")
    assert len(reads) == 1 and "embeddings.word_embeddings.weight" in second
    state = {k: v + 1 if k == "pooler.dense.bias" else v for k, v in second.items()}
    save_file(state, folder / "new.safetensors")  # Replaced as a checkpoint tool would.
    (folder / "new.safetensors").replace(folder / "model.safetensors")
    third = state_dict.read_state_dict(folder)
    assert len(reads) == 2
    np.testing.assert_array_equal(third["pooler.dense.bias"], second["pooler.dense.bias"] + 1)
  state_dict.read_state_dict(folder)
  state_dict.read_state_dict(folder)
  assert len(reads) == 4


def test_a_roberta_checkpoint_is_refused_by_its_model_type(tmp_path):
  """A RoBERTa encoder has BERT's key names, so it loaded cleanly as a BERT, with positions
  counted from 0 instead of after the padding index: wrong outputs, no error."""
  import torch
  import transformers
  torch.manual_seed(6)
  config = transformers.RobertaConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, intermediate_size=128,
                                      max_position_embeddings=42)
  transformers.RobertaModel(config).save_pretrained(tmp_path)
  with pytest.raises(ValueError, match=r"config.json: model_type 'roberta' is not a BERT"):
    towers.load("text", "hf_bert", tmp_path)
