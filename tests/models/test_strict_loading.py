"""Strict loading: missing, extra and misshapen keys are errors that name them."""

import json
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
  out.mkdir(parents=True)
  shutil.copy(folder / "config.json", out / "config.json")
  save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, out / "model.safetensors")
  return out


def test_a_weight_file_loads_as_its_folder(hf_bert):
  """A checkpoint named by its weight file (model.safetensors) is its folder's."""
  folder = hf_bert[1]
  module, by_folder = towers.load("text", "hf_bert", folder)
  same, by_file = towers.load("text", "hf_bert", state_dict.find_weights(folder))
  assert same == module
  jax.tree.map(np.testing.assert_array_equal, by_file, by_folder)


def test_missing_key_is_named(hf_bert, tmp_path):
  key = "encoder.layer.1.attention.self.key.weight"
  folder = _edited_copy(hf_bert[1], tmp_path, lambda s: s.pop(key))
  with pytest.raises(CheckpointError, match="missing keys") as e:
    towers.load("text", "hf_bert", folder)
  assert key in str(e.value) and "layer_1/attn/key/kernel" in str(e.value)


def test_extra_key_is_named(hf_bert, hf_bert_pretraining, tmp_path):
  # Whatever its name ends with.
  for other in ("encoder.layer.0.attention.self.rotary.bias",
                "encoder.layer.0.attention.self.relative_positions"):
    folder = _edited_copy(hf_bert[1], tmp_path / other,
                          lambda s: s.update({other: np.zeros(3, np.float32)}))
    with pytest.raises(CheckpointError, match="unexpected keys") as e:
      towers.load("text", "hf_bert", folder)
    assert other in str(e.value)
  key = "encoder.layer.0.attention.self.rotary.weight"
  folder = _edited_copy(hf_bert[1], tmp_path, lambda s: s.update({key: np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match="unexpected keys") as e:
    towers.load("text", "hf_bert", folder)
  assert key in str(e.value) and "the tower config's `unused`" in str(e.value)
  assert "fresh" not in str(e.value)  # Naming parameters fresh cannot leave keys out.
  # Named as deliberately unused (by the caller, or in the tower config), it loads.
  towers.load("text", "hf_bert", folder, unused=[r".*\.rotary\..*"])
  # In a checkpoint of a BERT with heads (keys under `bert.`), keys beside the BERT are heads
  # left out, but a key inside it is still one the tower has no place for.
  prefixed = _edited_copy(hf_bert_pretraining[1], tmp_path / "prefixed",
                          lambda s: s.update({"bert." + key: np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match="unexpected keys") as e:
    towers.load("text", "hf_bert", prefixed)
  assert "bert." + key in str(e.value)
  from configs.towers.common import tower
  cfg = tower("bert", "hf_bert", dict(pooler="cls"), checkpoint=str(folder))
  cfg.unused = (r".*\.rotary\..*",)
  towers.from_config(cfg)
  # The generative head's decoder, read from the same checkpoint, leaves them too (it was
  # refused for the key the tower config had named).
  from medvqa_jax.models import amif
  config = helpers.tiny_config()
  config.model.text = cfg
  config.model.text.arch.max_positions = None
  dec = amif.create(config)[1]["decoder"]
  fc1 = state_dict.read_state_dict(folder)["encoder.layer.0.intermediate.dense.weight"]
  np.testing.assert_array_equal(dec["layer_0"]["mlp"]["fc1"]["kernel"], fc1.T)


def test_a_decoder_part_the_checkpoint_has_in_part_is_refused(hf_bert_pretraining, tmp_path):
  """The decoder's cross-attention and LM head are initialised fresh where a checkpoint has
  none of their keys; one that has some of them (a damaged or foreign checkpoint) is missing
  the others, named, not silently re-initialised over the ones it has."""
  def edit(state):
    for name, shape in (("weight", (64, 64)), ("bias", (64,))):
      state[f"bert.encoder.layer.0.crossattention.self.query.{name}"] = np.ones(
          shape, np.float32)
    state.pop("cls.predictions.bias")
  folder = _edited_copy(hf_bert_pretraining[1], tmp_path, edit)
  with pytest.raises(CheckpointError, match="missing keys") as e:
    towers.load("text", "hf_bert", folder, causal=True, cross_from=0, lm_head=True,
                pooler="none")
  assert "bert.encoder.layer.0.crossattention.self.key.weight" in str(e.value)
  assert "cls.predictions.bias (for lm_bias)" in str(e.value)


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
  # A transposed weight has the right number of elements, but not the right shape: loaded,
  # it would mix the inputs (a checkpoint saved in another framework's layout).
  key = "vision_model.encoder.layers.1.mlp.fc1.weight"  # (128, 64) in torch's layout.
  folder = _edited_copy(hf_clip[1], tmp_path / "transposed",
                        lambda s: s.update({key: np.ascontiguousarray(s[key].T)}))
  with pytest.raises(CheckpointError, match="shape mismatches") as e:
    towers.load("image", "hf_clip", folder)
  assert f"{key}: checkpoint gives (128, 64), block_1/mlp/fc1/kernel needs (64, 128)" in str(
      e.value)


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
  # Drawn from the seed: another seed, another head (a seed sweep's runs differ there).
  _, other = towers.load("image", "hf_clip", folder, fresh=["head/.*"], seed=4)
  assert not np.allclose(other["head"]["proj"]["kernel"], kernel)
  # The same from a tower config, over a checkpoint that has the head (a head re-trained
  # from scratch): its `fresh` and the run's seed reach the load.
  from configs.towers.common import tower
  cfg = tower("vit", "hf_clip", {}, checkpoint=str(hf_clip[1]))
  cfg.fresh = ("head/.*",)
  for seed, want in ((3, kernel), (4, other["head"]["proj"]["kernel"])):
    _, from_cfg = towers.from_config(cfg, seed=seed)
    np.testing.assert_array_equal(from_cfg["head"]["proj"]["kernel"], want)
    np.testing.assert_array_equal(from_cfg["ln_final"]["scale"], full["ln_final"]["scale"])
  # A pattern matches a whole path: "head" names no parameter (the head's are head/...),
  # so with a complete checkpoint it re-initialises nothing.
  _, kept = towers.load("image", "hf_clip", hf_clip[1], fresh=["head"])
  np.testing.assert_array_equal(kept["head"]["proj"]["kernel"], full["head"]["proj"]["kernel"])


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
  # From a config, the folder is named by its flag (embed.py said "no weights in ..." alone).
  cfg.checkpoint = "/nonexistent/bert"
  with pytest.raises(FileNotFoundError, match=r"^--config.model.text.checkpoint=/nonexistent/bert: "
                                              r"checkpoint folder /nonexistent/bert does not"):
    towers.from_config(cfg, where="model.text")
  # A misspelt source is named with its flag, and the list has "init" (it was left out).
  cfg.source = "hf_brt"
  with pytest.raises(ValueError, match=r"^--config.model.text.source='hf_brt': unknown; expected "
                                       r"one of init, hf_clip, hf_bert, open_clip \(init: "):
    towers.from_config(cfg, where="model.text")


def test_a_training_checkpoint_and_a_sharded_one_load_whole(hf_bert, tmp_path):
  """A training framework's pickle ({"state_dict": ..., "epoch": ...}, PyTorch Lightning's)
  and a checkpoint split into shards (model.safetensors.index.json, as save_pretrained
  writes large models) load the same weights as the plain file."""
  import torch
  _, want = towers.load("text", "hf_bert", hf_bert[1])
  state = state_dict.read_state_dict(hf_bert[1])
  lightning = tmp_path / "lightning"
  lightning.mkdir()
  shutil.copy(hf_bert[1] / "config.json", lightning)
  torch.save({"state_dict": {k: torch.from_numpy(v) for k, v in state.items()}, "epoch": 3},
             lightning / "pytorch_model.bin")
  sharded = tmp_path / "sharded"
  sharded.mkdir()
  shutil.copy(hf_bert[1] / "config.json", sharded)
  keys = sorted(state)
  weight_map = {}
  for i, part in enumerate((keys[:len(keys) // 2], keys[len(keys) // 2:])):
    name = f"model-{i + 1:05d}-of-00002.safetensors"
    save_file({k: np.ascontiguousarray(state[k]) for k in part}, sharded / name)
    weight_map.update({k: name for k in part})
  (sharded / "model.safetensors.index.json").write_text(
      json.dumps({"metadata": {}, "weight_map": weight_map}))
  for folder in (lightning, sharded):
    _, params = towers.load("text", "hf_bert", folder)
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), params, want)
    assert all(jax.tree.leaves(same)), folder


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


def _bert_with(head_class, tmp_path, **config):
  """A BERT-with-a-head checkpoint (random weights) saved to a folder: (model, folder)."""
  import torch
  import transformers
  torch.manual_seed(7)
  cfg = transformers.BertConfig(vocab_size=120, hidden_size=64, num_hidden_layers=2,
                                num_attention_heads=4, intermediate_size=128,
                                max_position_embeddings=40, **config)
  model = getattr(transformers, head_class)(cfg).eval()
  folder = tmp_path / head_class
  model.save_pretrained(folder)
  return model, folder


def test_a_bert_with_a_task_head_loads_its_bert(tmp_path):
  """A BERT fine-tuned for a task (BertForSequenceClassification: `bert.` + `classifier.`)
  loads as a text tower, its head left out (it was refused, with advice that could not
  help); the tower computes what its BERT does."""
  import torch
  ref, folder = _bert_with("BertForSequenceClassification", tmp_path, num_labels=3)
  module, params = towers.load("text", "hf_bert", folder)
  ids = np.array([[2, 17, 33, 5, 3, 0, 0]])
  out = module.apply({"params": params}, ids, (ids != 0).astype(np.int32))
  with torch.no_grad():
    want = ref.bert(input_ids=torch.from_numpy(ids),
                    attention_mask=torch.from_numpy((ids != 0).astype(np.int64)))
  assert helpers.max_diff(out["tokens"][:, :5], want.last_hidden_state[:, :5]) < 1e-4
  assert helpers.max_diff(out["pooled"], want.pooler_output) < 1e-4


def test_an_untied_lm_head_is_refused_for_the_decoder(tmp_path):
  """The decoder's LM head multiplies by the word embeddings: a checkpoint whose LM output
  matrix is its own loaded with other logits, silently. Refused; tied, it loads."""
  untied = _bert_with("BertLMHeadModel", tmp_path / "untied", is_decoder=True,
                      tie_word_embeddings=False)[1]
  with pytest.raises(CheckpointError, match=r"cls.predictions.decoder.weight is not "
                     r"bert.embeddings.word_embeddings.weight \(an untied LM head\)"):
    towers.load("text", "hf_bert", untied, causal=True, lm_head=True, pooler="none")
  towers.load("text", "hf_bert", untied, pooler="cls")  # The encoder alone: no LM head read.
  tied = _bert_with("BertLMHeadModel", tmp_path / "tied", is_decoder=True)[1]
  towers.load("text", "hf_bert", tied, causal=True, lm_head=True, pooler="none")
  # The LM head's bias is the tied one too (cls.predictions.bias): its own is refused.
  def own_bias(state):
    state["cls.predictions.decoder.bias"] = state["cls.predictions.bias"] + 1.0
  own = _edited_copy(tied, tmp_path / "own_bias", own_bias)
  with pytest.raises(CheckpointError, match=r"cls.predictions.decoder.bias is not "
                     r"cls.predictions.bias \(an untied LM head\)"):
    towers.load("text", "hf_bert", own, causal=True, lm_head=True, pooler="none")


def test_one_clip_tower_saved_alone_loads_and_other_model_types_are_refused(tmp_path):
  """A CLIPVisionModelWithProjection folder (model_type clip_vision_model) was read as a
  default CLIPConfig (ViT-B/32): dozens of shape mismatches, or a wrong model by luck."""
  import torch
  import transformers
  from conftest import CLIP_BOS, CLIP_EOS, _clip_config
  torch.manual_seed(8)
  config = _clip_config()
  vision = transformers.CLIPVisionConfig(**{**config.vision_config.to_dict(),
                                            "projection_dim": 24})
  ref = transformers.CLIPVisionModelWithProjection(vision).eval()
  ref.save_pretrained(tmp_path / "vision")
  module, params = towers.load("image", "hf_clip", tmp_path / "vision")
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    want = ref(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).image_embeds
  assert helpers.max_diff(module.apply({"params": params}, x)["embedding"], want) < 1e-4
  with pytest.raises(ValueError, match=r"holds CLIP's image tower alone \(clip_vision_model\), "
                                       r"not an text tower"):
    towers.load("text", "hf_clip", tmp_path / "vision")
  # The plain towers (CLIPVisionModel, CLIPTextModel) have no projection, and transformers 5
  # saves their keys without the CLIPModel prefix: they load, with pooled outputs only (both
  # were refused, one as "not the hf_clip format", the other as missing its projection).
  plain = transformers.CLIPVisionModel(vision).eval()
  plain.save_pretrained(tmp_path / "plain_vision")
  module, params = towers.load("image", "hf_clip", tmp_path / "plain_vision")
  out = module.apply({"params": params}, x)
  with torch.no_grad():
    want = plain(pixel_values=torch.from_numpy(x).permute(0, 3, 1, 2)).pooler_output
  assert module.proj_dim is None and "embedding" not in out and "head" not in params
  assert helpers.max_diff(out["pooled"], want) < 1e-4
  text = transformers.CLIPTextModel(config.text_config).eval()
  text.save_pretrained(tmp_path / "plain_text")
  module, params = towers.load("text", "hf_clip", tmp_path / "plain_text")
  ids = np.array([[CLIP_BOS, 5, 9, CLIP_EOS], [CLIP_BOS, 7, CLIP_EOS, 0]])
  mask = (np.arange(4) < np.array([[4], [3]])).astype(np.int32)
  with torch.no_grad():
    want = text(input_ids=torch.from_numpy(ids),
                attention_mask=torch.from_numpy(mask)).pooler_output
  assert module.proj_dim is None
  assert helpers.max_diff(module.apply({"params": params}, ids, mask)["pooled"], want) < 1e-4
  transformers.BertModel(transformers.BertConfig(
      vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
      intermediate_size=64)).save_pretrained(tmp_path / "bert")
  with pytest.raises(ValueError, match=r"model_type 'bert' is not a CLIP model"):
    towers.load("image", "hf_clip", tmp_path / "bert")


def test_a_clip_checkpoint_missing_its_last_layers_is_refused(hf_clip, tmp_path):
  """The block count was read off the weights: a checkpoint cut after a whole block (a shard
  left out) loaded as a shallower tower. It is checked against config.json's."""
  def drop_last(state):
    for k in [k for k in state if ".encoder.layers.2." in k or "text_model.encoder.layers.1."
              in k]:
      del state[k]
  folder = _edited_copy(hf_clip[1], tmp_path, drop_last)
  with pytest.raises(CheckpointError, match=r"config.json states 3 layers, but the weights "
                     r"hold 2: the checkpoint is incomplete"):
    towers.load("image", "hf_clip", folder)
  with pytest.raises(CheckpointError, match="states 2 layers, but the weights hold 1"):
    towers.load("text", "hf_clip", folder)
  towers.load("image", "hf_clip", hf_clip[1], depth=2)  # Fewer blocks asked for: still fine.


def test_an_override_that_contradicts_the_checkpoint_is_refused(hf_bert, hf_clip, biomedclip):
  """Heads, activation and norm epsilon change no weight's shape: an override of them loaded
  cleanly and computed something else."""
  with pytest.raises(CheckpointError, match=r"config.json states num_heads=4, but the tower's "
                     r"arch sets num_heads=8"):
    towers.load("text", "hf_bert", hf_bert[1], num_heads=8)
  with pytest.raises(CheckpointError, match="states act='gelu', but the tower's arch sets "
                     "act='relu'"):
    towers.load("text", "hf_bert", hf_bert[1], act="relu")
  with pytest.raises(CheckpointError, match="states ln_eps=1e-12, but the tower's arch sets "
                     "ln_eps=1e-05"):
    towers.load("text", "hf_bert", hf_bert[1], ln_eps=1e-5)
  with pytest.raises(CheckpointError, match="states num_heads=4"):
    towers.load("image", "hf_clip", hf_clip[1], num_heads=2)
  with pytest.raises(CheckpointError, match="timm trunk states ln_eps=1e-06"):
    towers.load("image", "open_clip", biomedclip[1], ln_eps=1e-5)
  with pytest.raises(CheckpointError, match="states num_heads=4"):  # Its BERT's config.json.
    towers.load("text", "open_clip", biomedclip[1], num_heads=8)
  # The same values, and the fields a checkpoint leaves to the caller, load.
  module, _ = towers.load("text", "hf_bert", hf_bert[1], num_heads=4, depth=2, pooler="cls")
  assert (module.num_heads, module.depth, module.pooler) == (4, 2, "cls")


def test_a_folder_without_config_json_is_named_not_read_as_defaults(hf_bert, tmp_path):
  """transformers gives a default BertConfig (768 wide, 12 layers) for a folder without one."""
  shutil.copy(hf_bert[1] / "model.safetensors", tmp_path / "model.safetensors")
  with pytest.raises(FileNotFoundError, match=r"config.json not found: a Hugging Face "
                     r"checkpoint folder holds its config.json next to its weights \(found: "
                     r"\['model.safetensors'\]\)"):
    towers.load("text", "hf_bert", tmp_path)


def test_weight_files_that_cannot_be_read_are_named(hf_bert, tmp_path):
  import torch
  import transformers
  weights = (hf_bert[1] / "model.safetensors").read_bytes()
  cases = {
      "cut": ("model.safetensors", weights[:len(weights) // 2]),
      "empty": ("model.safetensors", b""),
      "lfs": ("model.safetensors", b"version https://git-lfs.github.com/spec/v1\noid sha256:"
              b"ab\nsize 1234\n"),
      "lfs_bin": ("pytorch_model.bin", b"version https://git-lfs.github.com/spec/v1\n"),
      "index": ("model.safetensors.index.json", b'{"weight_map": {"a": "x.safetensors"'),
  }
  for name, (file_name, content) in cases.items():
    folder = tmp_path / name
    folder.mkdir()
    shutil.copy(hf_bert[1] / "config.json", folder)
    (folder / file_name).write_bytes(content)
    with pytest.raises(CheckpointError) as e:
      towers.load("text", "hf_bert", folder)
    message = str(e.value)
    assert message.startswith(str(folder / file_name)), (name, message)
    if name.startswith("lfs"):
      assert "is a Git LFS pointer" in message and "git lfs pull" in message
    else:
      assert "cannot be read as" in message and "damaged, cut short" in message, message
  whole = tmp_path / "whole"  # A pickled model, not a state dict: its code would run.
  whole.mkdir()
  shutil.copy(hf_bert[1] / "config.json", whole)
  torch.save(transformers.BertModel(hf_bert[0].config), whole / "pytorch_model.bin")
  with pytest.raises(CheckpointError, match=r"pytorch_model.bin holds more than tensors \(a "
                     "whole pickled model"):
    towers.load("text", "hf_bert", whole)


def test_an_open_clip_folder_is_read_from_its_own_file_first(biomedclip, hf_bert, tmp_path):
  """Hub folders of open_clip models may also hold a transformers export (model.safetensors),
  which was read first, and failed on its keys."""
  folder = tmp_path / "both"
  shutil.copytree(biomedclip[1], folder)
  shutil.copy(hf_bert[1] / "model.safetensors", folder / "model.safetensors")
  _, params = towers.load("image", "open_clip", folder)
  _, expected = towers.load("image", "open_clip", biomedclip[1])
  np.testing.assert_array_equal(params["cls_token"], expected["cls_token"])


def test_an_open_clip_trunk_missing_its_last_blocks_is_refused(biomedclip, tmp_path):
  import torch
  state = torch.load(biomedclip[1] / "open_clip_pytorch_model.bin", weights_only=True)
  folder = tmp_path / "cut"
  folder.mkdir()
  shutil.copy(biomedclip[1] / "open_clip_config.json", folder)
  torch.save({k: v for k, v in state.items() if ".blocks.11." not in k},
             folder / "open_clip_pytorch_model.bin")
  with pytest.raises(CheckpointError, match=r"the timm trunk 'vit_tiny_patch16_224' has 12 "
                     r"blocks, but the weights hold 11"):
    towers.load("image", "open_clip", folder)


def test_a_weight_file_too_large_for_memory_is_not_called_damaged(hf_bert, monkeypatch):
  def no_memory(path):
    raise MemoryError()
  monkeypatch.setattr(state_dict, "_safetensors_load", no_memory)
  with pytest.raises(MemoryError):
    towers.load("text", "hf_bert", hf_bert[1])

  def device_memory(path):
    raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory allocating 268435456 bytes.")
  monkeypatch.setattr(state_dict, "_safetensors_load", device_memory)
  with pytest.raises(RuntimeError, match="RESOURCE_EXHAUSTED"):
    towers.load("text", "hf_bert", hf_bert[1])
