"""Bio_ClinicalBERT (a Hugging Face BERT folder): the paper's text tower."""

import ml_collections

from configs.towers.common import tower, unset


def get_config(arg=None):
  del arg
  return ml_collections.ConfigDict(dict(
      text=tower("bert", "hf_bert", dict(depth=unset(int), pooler="cls"), positions=512)))
