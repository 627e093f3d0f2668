"""The embedded default: tiny random towers and the bundled BERT vocabulary, so that it runs
on a laptop CPU with nothing downloaded. `python launch/embed.py --config=configs/demo.py`."""

from configs import base
from medvqa_jax import ASSETS


def get_config(arg=None):
  del arg
  config = base.get_config("image=tiny,text=tiny,teacher=tiny")
  config.model.text.tokenizer = str(ASSETS / "bert_uncased_vocab")
  config.teacher.text.tokenizer = str(ASSETS / "bert_uncased_vocab")
  return config
