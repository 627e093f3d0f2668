"""The embedded default: a tiny random AMiF (towers, fusion, GCA, generative head) with the
bundled BERT vocabulary, so that it runs on a laptop CPU with nothing downloaded.
`python launch/embed.py --config=configs/demo.py`."""

from configs import base
from medvqa_jax import ASSETS


def get_config(arg=None):
  del arg
  config = base.get_config("image=tiny,text=tiny,teacher=tiny")
  config.model.text.tokenizer = str(ASSETS / "bert_uncased_vocab")
  config.model.fusion.update(width=64, layers=2, heads=4, mlp_dim=128)
  config.model.decoder.cross_from = 1
  config.model.update(prior_max_tokens=64, answer_max_len=8, rank_k=4)
  config.teacher.text.tokenizer = str(ASSETS / "bert_uncased_vocab")
  config.teacher.logit_scale = 50.0  # A random teacher has no trained scale.
  return config
