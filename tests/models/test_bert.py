"""Parity of the BERT import with transformers, on a tiny random model and on the real
all-MiniLM-L6-v2 checkpoint."""

import numpy as np
import torch
import transformers

from helpers import max_diff, padded_ids
from medvqa_jax.data.tokenizer import Tokenizer
from medvqa_jax.models import towers
from medvqa_jax.models.bert import BertEncoder

TOL = 1e-4


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  ids, mask = padded_ids(rng, [20, 11, 3], 20, 120, first=101 % 120, last=102 % 120)
  types = np.zeros_like(ids)
  types[0, 12:] = 1  # A second segment, as for question + answer pairs.
  return ids, mask, types


def _torch(*arrays):
  return [torch.from_numpy(a) for a in arrays]


def _both(module, params, ref, seed=0):
  """Our tower's outputs and the transformers model's on the same random inputs."""
  ids, mask, types = _inputs(seed=seed)
  out = module.apply({"params": params}, ids, mask, types)
  t_ids, t_mask, t_types = _torch(ids, mask, types)
  with torch.no_grad():
    return out, ref(input_ids=t_ids, attention_mask=t_mask, token_type_ids=t_types)


def test_bert_matches_transformers_with_padding_and_token_types(hf_bert):
  ref, folder = hf_bert
  module, params = towers.load("text", "hf_bert", folder)
  assert isinstance(module, BertEncoder) and module.pooler == "dense"
  out, r = _both(module, params, ref)
  assert max_diff(out["tokens"], r.last_hidden_state) <= TOL  # Every token, pads included.
  assert max_diff(out["pooled"], r.pooler_output) <= TOL


def test_pretraining_checkpoint_with_prefix_and_heads(hf_bert_pretraining):
  """Bio_ClinicalBERT's layout: `bert.`-prefixed keys, MLM/NSP heads under `cls.`,
  PyTorch pickle. The encoder loads; the heads are deliberately left out."""
  ref, folder = hf_bert_pretraining
  module, params = towers.load("text", "hf_bert", folder)
  ids, mask, types = _inputs(seed=1)
  out = module.apply({"params": params}, ids, mask, types)
  t_ids, t_mask, t_types = _torch(ids, mask, types)
  with torch.no_grad():
    r = ref.bert(input_ids=t_ids, attention_mask=t_mask, token_type_ids=t_types)
  assert max_diff(out["tokens"], r.last_hidden_state) <= TOL
  assert max_diff(out["pooled"], r.pooler_output) <= TOL


def test_the_lm_head_gives_the_checkpoints_word_logits(hf_bert_pretraining, tmp_path):
  """Loaded with its masked-LM head (the generative decoder's start), the encoder's word
  logits are BertForPreTraining's: the head's dense kernel (square: a transpose would keep
  its shape), its activation then its LayerNorm (randomised in the fixture), and the output
  tied to the word embeddings with the checkpoint's bias. Also from a checkpoint saved from
  a DataParallel wrapper, whose keys begin with "module."."""
  ref, folder = hf_bert_pretraining
  module, params = towers.load("text", "hf_bert", folder, lm_head=True, pooler="none")
  out, r = _both(module, params, ref, seed=2)
  assert max_diff(out["logits"], r.prediction_logits) <= TOL
  wrapped = tmp_path / "data_parallel"
  ref.config.save_pretrained(wrapped)
  torch.save({f"module.{k}": v for k, v in ref.state_dict().items()},
             wrapped / "pytorch_model.bin")
  _, again = towers.load("text", "hf_bert", wrapped, lm_head=True, pooler="none")
  assert all(_equal_trees(again, params))


def _equal_trees(a, b):
  import jax
  return jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def test_legacy_layernorm_names(hf_bert, tmp_path):
  """Checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta."""
  import shutil
  from safetensors.numpy import save_file
  from medvqa_jax.models import state_dict
  ref, folder = hf_bert
  state = state_dict.read_state_dict(folder)
  legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias",
                                                                      "LayerNorm.beta"): v
            for k, v in state.items()}
  assert "embeddings.LayerNorm.gamma" in legacy
  shutil.copy(folder / "config.json", tmp_path / "config.json")
  save_file(legacy, tmp_path / "model.safetensors")
  _, params = towers.load("text", "hf_bert", tmp_path)
  _, expected = towers.load("text", "hf_bert", folder)
  np.testing.assert_array_equal(params["embed_ln"]["scale"], expected["embed_ln"]["scale"])
  np.testing.assert_array_equal(params["layer_2"]["mlp_ln"]["bias"],
                                expected["layer_2"]["mlp_ln"]["bias"])


def test_bert_keeps_first_layers(hf_bert):
  ref, folder = hf_bert
  module, params = towers.load("text", "hf_bert", folder, depth=2)
  assert "layer_2" not in params
  ids, mask, types = _inputs(seed=2)
  out = module.apply({"params": params}, ids, mask, types)
  t_ids, t_mask, t_types = _torch(ids, mask, types)
  with torch.no_grad():
    r = ref(input_ids=t_ids, attention_mask=t_mask, token_type_ids=t_types,
            output_hidden_states=True)
  assert max_diff(out["tokens"], r.hidden_states[2]) <= TOL


QUESTIONS = [
    "Is there evidence of a pneumothorax in the right upper lobe?",
    "What organ system is shown?",
    "Are the lateral ventricles dilated, and is the x-ray AP or PA?",
    "yes",
]


def test_real_minilm_checkpoint_and_tokenizer(minilm_dir):
  ref_tok = transformers.AutoTokenizer.from_pretrained(str(minilm_dir), local_files_only=True)
  tok = Tokenizer.from_folder(minilm_dir, max_len=24)
  batch = tok(QUESTIONS)
  expected = ref_tok(QUESTIONS, max_length=24, padding="max_length", truncation=True)
  np.testing.assert_array_equal(batch["input_ids"], np.asarray(expected["input_ids"]))
  np.testing.assert_array_equal(batch["attention_mask"], np.asarray(expected["attention_mask"]))
  assert batch["input_ids"][0, 0] == ref_tok.cls_token_id  # Real ids, not all-UNK.
  assert (batch["input_ids"] != ref_tok.unk_token_id).all()

  module, params = towers.load("text", "hf_bert", minilm_dir)
  assert (module.width, module.depth, module.num_heads) == (384, 6, 12)
  ref = transformers.BertModel.from_pretrained(str(minilm_dir), local_files_only=True).eval()
  out = module.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                     batch["token_type_ids"])
  with torch.no_grad():
    r = ref(**{k: torch.from_numpy(v.astype(np.int64)) for k, v in batch.items()})
  assert max_diff(out["tokens"], r.last_hidden_state) <= TOL
  assert max_diff(out["pooled"], r.pooler_output) <= TOL


def test_the_lm_head_applies_the_checkpoints_activation(tmp_path):
  """The masked-LM head's transform uses the config's hidden_act (here relu), as the
  encoder's MLP does, not GELU whatever the config says: logits equal BertForPreTraining's
  for a checkpoint saved with save_pretrained, every bias random (a fresh one's are zero)."""
  torch.manual_seed(5)
  config = transformers.BertConfig(
      vocab_size=120, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=128, max_position_embeddings=40, type_vocab_size=2, hidden_act="relu")
  ref = transformers.BertForPreTraining(config).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith("bias"):
        p.normal_(0.0, 0.5)
  ref.save_pretrained(tmp_path)
  module, params = towers.load("text", "hf_bert", tmp_path, lm_head=True, pooler="none")
  assert module.act == "relu"
  out, r = _both(module, params, ref, seed=4)
  assert max_diff(out["logits"], r.prediction_logits) <= TOL
