"""Starting a run from another run's parameters (`medvqa_jax/train/warm_start.py`): what is
taken, what is named as left initial or not taken, and the warnings."""

import logging

import jax
import jax.numpy as jnp
import numpy as np

from medvqa_jax.train import checkpoint as ckpt_lib
from medvqa_jax.train import warm_start


def test_init_from_names_what_it_leaves_initial_and_warns_of_a_part_taken_in_part(
    tmp_path, caplog):
  """A run with one fusion layer and no head, taken into a model with two fusion layers and a
  head: its arrays are copied, the rest named (they stay random), and the fusion, half from
  the run and half initial (another depth), warned of; a model without the run's fusion
  names the arrays it does not take."""
  import ml_collections

  def params(layers, head):
    tree = {"image": {"block_0": {"kernel": jnp.full((2, 2), 5.0)}},
            "fusion": {f"layer_{i}": {"kernel": jnp.full((2, 2), 6.0 + i)}
                       for i in range(layers)}}
    if head:
      tree["head"] = {"kernel": jnp.zeros((2, 3)), "bias": jnp.zeros(3)}
    return tree

  ckpts = ckpt_lib.Checkpoints(tmp_path / "run" / "checkpoints")
  ckpts.save(1, {"params": params(1, False), "step": jnp.int32(1)}, {"step": 1})
  ckpts.close()
  config = ml_collections.ConfigDict({"train": {"init_from": str(tmp_path / "run"),
                                                "init_params": ".*"}})

  def take(own):
    own = jax.tree.map(jnp.zeros_like, own)
    shardings = {"params": jax.tree.map(
        lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), own)}
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      state, taken, summary = warm_start.from_run(config, {"params": own}, shardings, None)
    warned = [r.getMessage() for r in caplog.records if r.name == warm_start.log.name]
    return state["params"], taken, summary, warned

  got, taken, out, warned = take(params(2, True))
  assert taken == {"image/block_0/kernel", "fusion/layer_0/kernel"}
  np.testing.assert_array_equal(got["fusion"]["layer_0"]["kernel"], np.full((2, 2), 6.0))
  np.testing.assert_array_equal(got["fusion"]["layer_1"]["kernel"], np.zeros((2, 2)))
  assert out == ("initialised 2 of 5 parameter arrays ('.*') from "
                 f"{tmp_path / 'run' / 'checkpoints'} step 1; left at their initial values, "
                 "not in it: fusion/layer_1 (1), head/bias (1), head/kernel (1)")
  (warning,) = warned
  assert warning.endswith("step 1 initialises fusion only in part (another depth or layout "
                          "there than here?): fusion/layer_1 (1)")
  # A model without the run's fusion: its arrays are named; no part is taken in part.
  got, taken, out, warned = take({"image": params(1, False)["image"]})
  assert taken == {"image/block_0/kernel"}
  assert out.endswith("; in it but not in this model: fusion/layer_0 (1)")
  assert not warned  # The model has no fusion at all: nothing of it was taken in part.
  # Arrays of the run that train.init_params leaves out are not among those it does not take.
  config.train.init_params = "image/.*"
  got, taken, out, warned = take({"image": params(1, False)["image"]})
  assert taken == {"image/block_0/kernel"}
  assert "initialised 1 of 1 parameter arrays ('image/.*') from " in out
  assert "not in this model" not in out and not warned
  config.train.init_params = ".*"
  # Text parameters from a checkpoints folder without the run's tokenizer copy beside it (a
  # copied folder): their vocabulary cannot be checked, which is said.
  ckpts = ckpt_lib.Checkpoints(tmp_path / "copy")
  ckpts.save(1, {"params": {"text": {"word_embed": jnp.ones((4, 2))}}, "step": jnp.int32(1)},
             {"step": 1})
  ckpts.close()
  config.train.init_from, config.model = str(tmp_path / "copy"), {"text": {"max_len": 8}}
  got, taken, out, warned = take({"text": {"word_embed": jnp.zeros((4, 2))}})
  assert taken == {"text/word_embed"}
  assert warned == [f"init_from {tmp_path / 'copy'}: no {tmp_path / 'tokenizer'} folder beside "
                    "it (the copy its run saved), so its text tower and decoder parameters (1 "
                    "arrays) are taken unchecked: they read this run's token ids (model.text), "
                    "right only if that run used the same tokenizer"]


def test_a_frozen_tower_is_warned_of_unless_init_from_filled_it_whole(caplog):
  import ml_collections
  params = {"image": {"a": jnp.zeros(2), "b": jnp.zeros(2)}, "text": {"c": jnp.zeros(2)}}
  config = ml_collections.ConfigDict({
      "optim": {"lr_mults": ((r"image/.*", 0.0),)},
      "model": {"image": {"source": "init"}, "text": {"source": "init"}}})

  def warned(taken):
    caplog.clear()
    with caplog.at_level(logging.WARNING):
      warm_start.warn_frozen_random(config, params, taken)
    return [r.getMessage() for r in caplog.records if r.name == warm_start.log.name]

  assert warned(set()) == [
      "the image tower is frozen (optim.lr_mults) but randomly initialised (2 of its 2 "
      "parameter arrays): start from a run that trained it with "
      "--config.train.init_from=RUN (train.init_params covering it)"]
  assert "(1 of its 2 parameter arrays)" in warned({"image/a"})[0]  # Taken in part.
  assert warned({"image/a", "image/b"}) == []  # The text tower trains: not warned of.
  config.model.image.source = "hf_clip"  # Read from a tower checkpoint.
  assert warned(set()) == []
  config.model.image.source = "init"
  config.optim.lr_mults = ((r"image/a", 0.0),)  # Part of it frozen, the rest trains.
  assert warned(set()) == []
