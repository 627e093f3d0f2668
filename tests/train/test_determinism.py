"""train.deterministic (medvqa_jax/train/determinism.py): XLA's deterministic GPU kernels for
what a run compiles. What they change shows on a GPU only (BENCHMARKS.md: the H200's program
compiled with and without them). Checked here: they are asked for on GPUs only, XLA knows
them, every program of a run that decides its parameters or its choices is compiled with
them, and they change no number on the CPU."""

import types

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from ml_collections import ConfigDict

import helpers
from medvqa_jax.train import determinism
from medvqa_jax.train import sharding
from medvqa_jax.train import step as step_lib

# An option XLA does not know: a program compiled with it is refused, so a program that
# refuses it was compiled with the run's options.
UNKNOWN = {"xla_gpu_no_such_option_here": True}


def _asking(deterministic: bool | None) -> ConfigDict:
  train = {} if deterministic is None else {"deterministic": deterministic}
  return ConfigDict({"train": train})


def _mesh_of(platform: str):
  """A stand-in for a mesh of `platform`'s devices (what compiler_options reads of it)."""
  return types.SimpleNamespace(devices=np.array([types.SimpleNamespace(platform=platform)]))


def test_the_options_are_asked_for_on_gpus_only():
  for platform in ("gpu", "cuda", "rocm"):
    mesh = _mesh_of(platform)
    assert determinism.compiler_options(_asking(True), mesh) == determinism.GPU_OPTIONS
    assert determinism.compiler_options(_asking(False), mesh) is None
    # A run recorded before the field existed compiles as it did.
    assert determinism.compiler_options(_asking(None), mesh) is None
  for platform in ("cpu", "tpu"):
    assert determinism.compiler_options(_asking(True), _mesh_of(platform)) is None
  assert determinism.compiler_options(_asking(True), sharding.make_mesh()) is None  # A CPU.
  options = determinism.compiler_options(_asking(True), _mesh_of("gpu"))
  options.clear()  # A copy: the module's own stay.
  assert determinism.GPU_OPTIONS


def test_xla_knows_the_options():
  """XLA refuses an option it does not know, so a misspelt one would stop every GPU run at
  its first step. The CPU compiler reads the same option list as the GPU's."""
  x = jnp.arange(16.0).reshape(4, 4)
  compiled = jax.jit(lambda a: a @ a, compiler_options=determinism.GPU_OPTIONS).lower(x).compile()
  np.testing.assert_array_equal(compiled(x), x @ x)
  with pytest.raises(Exception, match="No such compile option"):
    jax.jit(lambda a: a @ a, compiler_options=UNKNOWN)(x)


def _toy_step(options):
  """A train step over an embedding table (its gradient is a scatter-add) and a dense layer,
  two steps from the same state."""
  mesh = sharding.make_mesh()
  rng = np.random.default_rng(0)
  params = {"embed": rng.normal(size=(50, 8)).astype(np.float32),
            "dense": rng.normal(size=(8, 3)).astype(np.float32)}

  def objective(p, batch, key):
    x = jnp.take(p["embed"], batch["ids"], axis=0).mean(axis=1)
    noise = jax.random.normal(key, x.shape) * 0.01
    loss = optax.softmax_cross_entropy_with_integer_labels((x + noise) @ p["dense"],
                                                           batch["labels"]).mean()
    return loss, {"loss": loss}
  tx = optax.adamw(1e-2)
  shardings = step_lib.state_shardings(mesh, params, tx)
  state = step_lib.init_state(params, tx, shardings)
  step = step_lib.make_train_step(objective, tx, shardings, compiler_options=options)
  batch = sharding.shard_batch(mesh, {"ids": rng.integers(0, 50, (8, 5)).astype(np.int32),
                                      "labels": rng.integers(0, 3, (8,)).astype(np.int32)})
  key = step_lib.base_key(0, mesh=mesh)
  for _ in range(2):
    state, metrics = step(state, batch, key)
  return jax.device_get(state), float(metrics["loss"])


def test_the_train_step_is_compiled_with_them_and_steps_alike_on_the_cpu():
  plain, loss = _toy_step(None)
  same, same_loss = _toy_step(determinism.GPU_OPTIONS)
  assert same_loss == loss
  jax.tree.map(np.testing.assert_array_equal, same, plain)
  with pytest.raises(Exception, match="No such compile option"):
    _toy_step(UNKNOWN)


@pytest.fixture
def refusing(monkeypatch):
  """Programs that take the run's options here (the CPU counted a GPU) refuse them."""
  monkeypatch.setattr(determinism, "GPU_PLATFORMS", ("cpu",))
  monkeypatch.setattr(determinism, "GPU_OPTIONS", UNKNOWN)


def test_prediction_and_validation_are_compiled_with_them(refusing):
  from medvqa_jax.data import tokenizer as tokenizer_lib
  from medvqa_jax.evaluate import vqa
  from medvqa_jax.models import amif
  config = helpers.tiny_config()
  model, params = amif.create(config)
  tokenizer = tokenizer_lib.from_config(config.model.text)
  mesh = sharding.make_mesh()
  size = model.image.image_size
  questions = tokenizer(["is there a fracture", "what organ is shown"])
  batch = sharding.shard_batch(mesh, {"images": np.zeros((2, size, size, 3), np.uint8),
                                      "input_ids": questions["input_ids"],
                                      "attention_mask": questions["attention_mask"]})
  for deterministic, refused in ((False, False), (True, True)):
    config.train.deterministic = deterministic
    predictor = vqa.Predictor(model, config, ["yes", "no", "left lung"], tokenizer, mesh,
                              sharding.param_shardings(mesh, params))
    if refused:
      with pytest.raises(Exception, match="No such compile option"):
        predictor(params, batch)
    else:
      jax.device_get(predictor(params, batch))


def test_the_online_teacher_and_pretraining_validation_are_compiled_with_them(refusing):
  from configs import pretrain_stage1
  from medvqa_jax import ASSETS
  from medvqa_jax.data import splits as splits_lib
  from medvqa_jax.data import tokenizer as tokenizer_lib
  from medvqa_jax.evaluate import pretrain as pretrain_eval
  from medvqa_jax.models import amif
  from medvqa_jax.train import teacher_feed
  config = pretrain_stage1.get_config("image=tiny,text=tiny,teacher=tiny")
  vocab = str(ASSETS / "bert_uncased_vocab")
  config.model.text.update(tokenizer=vocab, max_len=16)
  config.model.image.arch.image_size = 32
  config.model.fusion.update(width=64, layers=1, heads=4, mlp_dim=128)
  config.teacher.text.tokenizer = vocab
  config.teacher.update(mode="online", logit_scale=50.0)
  config.train.update(batch_size=4, deterministic=True)
  config.data.workers = 0
  mesh = sharding.make_mesh()
  teacher = teacher_feed.BatchTeacher(config, {}, mesh)
  tok, size = teacher.pipeline_option()
  t = tok(["a caption", "another one", "a third", "and a fourth"])
  inputs = sharding.shard_batch(mesh, {"teacher_pixels": np.zeros((4, size, size, 3), np.uint8),
                                       "teacher_input_ids": t["input_ids"],
                                       "teacher_attention_mask": t["attention_mask"]})
  with pytest.raises(Exception, match="No such compile option"):
    teacher.device_fields(inputs)

  model, params = amif.create(config)
  tokenizer = tokenizer_lib.from_config(config.model.text)
  rng = np.random.default_rng(0)
  source = [{"id": f"c{i}", "image": rng.integers(0, 255, (40, 48, 3), np.uint8),
             "caption": f"axial ct of the chest number {i}"} for i in range(4)]
  split = splits_lib.Split("val", source, [{"id": ex["id"], "image_id": f"p{i}"}
                                           for i, ex in enumerate(source)])
  config.teacher.mode = "none"
  validator = pretrain_eval.Validator(model, config, split, tokenizer, model.image.image_size,
                                      mesh)
  with pytest.raises(Exception, match="No such compile option"):
    validator(params, step=1)


def test_the_loop_compiles_its_step_with_them(refusing, tmp_path):
  """A fine-tuning run asking for them stops at its first train step: no checkpoint is
  written. (Its first validation, the next program compiled with them, comes at step 2,
  after step 1's checkpoint.)"""
  from medvqa_jax.train import loop
  config = helpers.tiny_config()
  config.data.update(dir=str(tmp_path / "data"), val_fraction=0.1,
                     source_dir=str(helpers.demo_part(tmp_path / "source", 64, 16)))
  config.optim.total_steps = 2
  config.train.update(workdir=str(tmp_path / "run"), epochs=0, batch_size=8, save_every=1,
                      eval_every=2, tensorboard=False, deterministic=True)
  with pytest.raises(Exception, match="No such compile option"):
    loop.train(config)
  assert not list((tmp_path / "run" / "checkpoints").glob("[0-9]*"))
