"""Co-attention fusion against transformers' BertLayer with cross-attention."""

import jax
import numpy as np
import pytest
import torch
import transformers

from helpers import max_diff
from medvqa_jax.models import layers, state_dict
from medvqa_jax.models.fusion import CoAttentionFusion

D, HEADS, MLP = 32, 4, 64


@pytest.fixture(scope="module")
def bert_layers():
  """Four BertLayers with cross-attention (eager attention), random LayerNorms."""
  config = transformers.BertConfig(hidden_size=D, num_attention_heads=HEADS, intermediate_size=MLP,
                                   is_decoder=True, add_cross_attention=True,
                                   attn_implementation="eager")
  torch.manual_seed(0)
  out = []
  for _ in range(4):
    layer = transformers.models.bert.modeling_bert.BertLayer(config).eval()
    with torch.no_grad():
      for m in layer.modules():
        if isinstance(m, torch.nn.LayerNorm):
          m.weight.normal_(1, 0.2)
          m.bias.normal_(0, 0.2)
    out.append(layer)
  return out


def _layer_mapping(path):
  m = state_dict.Mapping()
  m.attention(f"{path}/attn", "attention.self.query", "attention.self.key",
              "attention.self.value", "attention.output.dense", HEADS)
  m.layernorm(f"{path}/attn_ln", "attention.output.LayerNorm")
  m.attention(f"{path}/cross_attn", "crossattention.self.query", "crossattention.self.key",
              "crossattention.self.value", "crossattention.output.dense", HEADS)
  m.layernorm(f"{path}/cross_ln", "crossattention.output.LayerNorm")
  m.dense(f"{path}/mlp/fc1", "intermediate.dense")
  m.dense(f"{path}/mlp/fc2", "output.dense")
  m.layernorm(f"{path}/mlp_ln", "output.LayerNorm")
  return m


def _params_from(torch_layers, paths, template):
  mapping, state = state_dict.Mapping(), {}
  for i, (layer, path) in enumerate(zip(torch_layers, paths)):
    for k, v in layer.state_dict().items():
      state[f"{i}.{k}"] = v.numpy()
    for p, e in _layer_mapping(path).entries.items():
      mapping.add(p, [f"{i}.{k}" for k in e.keys], e.fn)
  return state_dict.assemble(state, mapping, template, source="test")


def _additive(mask):
  """transformers' 4-D additive mask over keys."""
  return torch.from_numpy((1.0 - mask[:, None, None, :].astype(np.float32)) * -1e9)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  text = rng.normal(size=(3, 7, D)).astype(np.float32)
  image = rng.normal(size=(3, 5, D)).astype(np.float32)
  text_mask = (np.arange(7)[None] < np.array([[7], [4], [2]])).astype(np.int32)
  image_mask = (np.arange(5)[None] < np.array([[5], [5], [3]])).astype(np.int32)
  return text, text_mask, image, image_mask


def test_co_attention_layer_matches_bert_cross_layer(bert_layers):
  block = layers.PostLNBlock(HEADS, MLP, "gelu", 1e-12, cross=True)
  text, text_mask, image, image_mask = _inputs()
  template = jax.eval_shape(lambda: block.init(jax.random.PRNGKey(0), text,
                                               context=image)["params"])
  params = _params_from(bert_layers[:1], [""], {"": template})[""]
  ours = block.apply({"params": params}, text, layers.attention_bias(text_mask), image,
                     layers.attention_bias(image_mask))
  with torch.no_grad():
    ref = bert_layers[0](torch.from_numpy(text), attention_mask=_additive(text_mask),
                         encoder_hidden_states=torch.from_numpy(image),
                         encoder_attention_mask=_additive(image_mask))
  assert max_diff(ours, ref) <= 1e-5


def test_two_stream_fusion_matches_reference_composition(bert_layers):
  """Two layers per stream; each layer's streams read the previous layer's pair."""
  fusion = CoAttentionFusion(num_layers=2, num_heads=HEADS, mlp_dim=MLP)
  text, text_mask, image, image_mask = _inputs(seed=1)
  template = jax.eval_shape(lambda: fusion.init(jax.random.PRNGKey(0), text, text_mask, image,
                                                image_mask)["params"])
  paths = ["text_layer_0", "image_layer_0", "text_layer_1", "image_layer_1"]
  params = _params_from(bert_layers, paths, template)
  ours = fusion.apply({"params": params}, text, text_mask, image, image_mask)
  t, i = torch.from_numpy(text), torch.from_numpy(image)
  tm, im = _additive(text_mask), _additive(image_mask)
  with torch.no_grad():
    for layer in range(2):
      text_layer, image_layer = bert_layers[2 * layer], bert_layers[2 * layer + 1]
      t, i = (text_layer(t, attention_mask=tm, encoder_hidden_states=i, encoder_attention_mask=im),
              image_layer(i, attention_mask=im, encoder_hidden_states=t, encoder_attention_mask=tm))
  assert max_diff(ours["text"], t) <= 1e-5
  assert max_diff(ours["image"], i) <= 1e-5


def test_fusion_ignores_padded_tokens():
  fusion = CoAttentionFusion(num_layers=2, num_heads=HEADS, mlp_dim=MLP)
  text, text_mask, image, image_mask = _inputs(seed=2)
  params = fusion.init(jax.random.PRNGKey(0), text, text_mask, image, image_mask)["params"]
  a = fusion.apply({"params": params}, text, text_mask, image, image_mask, return_weights=True)
  noisy_text = np.where(text_mask[..., None] == 1, text, 50.0)
  noisy_image = np.where(image_mask[..., None] == 1, image, -50.0)
  b = fusion.apply({"params": params}, noisy_text, text_mask, noisy_image, image_mask)
  assert max_diff(a["text"][text_mask == 1], b["text"][text_mask == 1]) <= 1e-6
  assert max_diff(a["image"][image_mask == 1], b["image"][image_mask == 1]) <= 1e-6
  # Cross-attention weights on padded keys are zero; rows sum to one.
  w = np.asarray(a["text_cross_weights"][-1])  # (B, heads, Lt, Li)
  assert np.all(w[2, :, :, 3:] == 0) and np.allclose(w.sum(-1), 1, atol=1e-6)
