"""The optimizer's parameter groups: learning-rate multipliers and freezing by path regex."""

import jax
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

from medvqa_jax.train import optim

PARAMS = {"image": {"block_0": {"kernel": np.ones((2, 2), np.float32)}},
          "text": {"ln": {"scale": np.ones((2,), np.float32)}},
          "fusion": {"kernel": np.ones((2, 2), np.float32)}}


def _cfg(rules):
  return ConfigDict(dict(lr=1e-3, weight_decay=0.1, b1=0.9, b2=0.98, warmup_fraction=0.0,
                         total_steps=10, lr_mults=rules, grad_clip=None))


def test_rules_label_whole_paths_first_match_wins():
  labels = optim.param_labels(PARAMS, ((r"image/.*", 0.0), (r"text/.*", 0.1), (r".*", 0.1)))
  assert labels == {"image": {"block_0": {"kernel": "frozen"}},
                    "text": {"ln": {"scale": "lr_x0.1"}}, "fusion": {"kernel": "lr_x0.1"}}


def test_a_rule_matching_no_parameter_is_refused():
  # "img/.*" (another code base's name for the image tower) would freeze nothing, silently.
  with pytest.raises(ValueError, match=r"\['img/\.\*'\] match no parameter path; paths start "
                                       r"with \['fusion', 'image', 'text'\]"):
    optim.make(_cfg(((r"img/.*", 0.0), (r"text/.*", 0.0))), PARAMS)
  with pytest.raises(ValueError, match="match no parameter path"):
    optim.frozen_mask(_cfg(((r"image", 0.0),)), PARAMS)  # Must match a whole path.


def test_frozen_parameters_do_not_move_and_decay_reaches_the_others():
  tx = optim.make(_cfg(((r"image/.*", 0.0),)), PARAMS)
  params, state = PARAMS, tx.init(PARAMS)
  zeros = jax.tree.map(np.zeros_like, PARAMS)
  for _ in range(3):
    updates, state = tx.update(zeros, state, params)
    params = optax.apply_updates(params, updates)
  assert np.all(params["image"]["block_0"]["kernel"] == 1)  # Frozen: no update, no decay.
  # Zero gradients: only weight decay moves the rest, LayerNorm scales included.
  assert np.all(params["text"]["ln"]["scale"] < 1) and np.all(params["fusion"]["kernel"] < 1)
