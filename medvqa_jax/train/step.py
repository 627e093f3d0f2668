"""The train state and the one jitted, sharded train step.

The state is a plain dict {"params", "opt_state", "step"} placed on the mesh by
`sharding.param_shardings` (optimizer state sharded like its parameters). The step is written
on the global batch; the partitioner inserts the collectives. The state's buffers are
donated. Gradient accumulation splits the batch into micro-batches inside the step.
"""

from __future__ import annotations

import logging
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from medvqa_jax.losses.pretrain import TERMS, pretrain_loss
from medvqa_jax.models import heads
from medvqa_jax.models.amif import RANK_SCORES, AMiF
from medvqa_jax.train import optim, sharding

log = logging.getLogger(__name__)

# optax.global_norm is deprecated in favour of optax.tree.norm (absent from older optax).
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def pretrain_objective(model: AMiF, losses_cfg) -> Callable:
  return lambda params, batch, key: pretrain_loss(model, params, batch, key, losses_cfg)


# An objective's metrics may hold EXAMPLES: the number of examples its loss is a mean over
# (when not all of the batch). Gradient accumulation weights each micro-batch by it, so the
# accumulated step is the step of the whole batch; it is not reported as a metric.
EXAMPLES = "examples"


def finetune_objective(model: AMiF, prior_ids, prior_mask) -> Callable:
  """The VQA loss. The answer prior (from the training answers) is fixed for the run, so it
  is a constant of the objective, not part of the per-example batch. The classifier's loss
  is a mean over the examples whose answer is in its vocabulary (label >= 0) only, the
  generative head's over those with a non-empty answer (`heads.has_answer`)."""
  def loss(params, batch, key):
    if model.head == "classifier":
      extra = {"labels": batch["labels"]}
      examples = jnp.sum(batch["labels"] >= 0)
    else:
      extra = {"answer_ids": batch["answer_ids"], "answer_mask": batch["answer_mask"]}
      examples = jnp.sum(heads.has_answer(batch["answer_mask"]))
    out = model.apply({"params": params}, batch["images"], batch["input_ids"],
                      batch["attention_mask"], prior_ids, prior_mask, **extra, method=AMiF.vqa,
                      rngs={"dropout": key})
    return out["loss"], {"loss": out["loss"], EXAMPLES: examples}
  return loss


def state_shardings(mesh, params, tx, rules=(".*",), min_size: int = 2 ** 14):
  shapes = jax.eval_shape(lambda p: p, params)
  sharding.check_rules(shapes, rules)
  idle = sharding.idle_rules(shapes, rules, mesh.shape["fsdp"], min_size)
  if idle:
    log.warning("train.fsdp_rules %s shard none of the parameters they match (each is under "
                "train.fsdp_min_size=%d elements or has no dimension train.fsdp=%d divides): "
                "those stay whole on every device", idle, min_size, mesh.shape["fsdp"])
  opt_shapes = jax.eval_shape(tx.init, shapes)
  params = sharding.param_shardings(mesh, shapes, rules, min_size)
  return {"params": params,
          "opt_state": sharding.follow_params(mesh, shapes, params, opt_shapes),
          "step": NamedSharding(mesh, P())}


def init_state(params, tx, shardings) -> dict:
  """The train state born sharded: params placed by their shardings, the optimizer state
  initialised by a jitted function whose outputs are sharded likewise."""
  # A jitted copy, not device_put: the step donates the state's buffers, and device_put may
  # hand back the caller's own arrays.
  params = jax.jit(lambda p: p, out_shardings=shardings["params"])(params)
  opt_state = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings["step"])
  return {"params": params, "opt_state": opt_state, "step": step}


def create_state(init: Callable, tx, shardings, *args) -> dict:
  """The train state born sharded: `init(*args)` -> params and the optimizer state made by
  one jitted function whose outputs are placed by `shardings`."""
  def make(*args):
    params = init(*args)
    return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}
  return jax.jit(make, out_shardings=shardings)(*args)


def freeze(objective: Callable, frozen) -> Callable:
  """The objective with the `frozen` parameters (a pytree of bools like the params, or None)
  behind stop_gradient: their gradients are zeros that cost nothing to compute."""
  if frozen is None:
    return objective

  def frozen_objective(params, *args):
    params = jax.tree.map(lambda p, f: jax.lax.stop_gradient(p) if f else p, params, frozen)
    return objective(params, *args)
  return frozen_objective


def check_batch(config, batch_size: int, devices: int) -> None:
  """Refuses a batch the step cannot run as the objective means it, before anything runs."""
  accum = config.train.accum_steps
  if batch_size < 1 or accum < 1:
    raise ValueError(f"the batch size ({batch_size}) and train.accum_steps ({accum}) must be "
                     "1 or more")
  if batch_size % (devices * accum):
    raise ValueError(f"the batch size {batch_size} must be divisible by the device count "
                     f"({devices}) times train.accum_steps ({accum})")
  if config.model.head == "none" and accum > 1:
    raise ValueError(
        "pre-training compares each example with the whole global batch (the rows of the "
        "soft-label contrastive losses, the ITM negatives), so train.accum_steps > 1 would "
        "train another objective (each micro-batch on its own): use train.accum_steps=1 and, "
        "to fit the memory, compute.remat or more devices")
  if config.model.head == "none" and batch_size < 2:
    raise ValueError("pre-training needs at least 2 examples per batch: an example's ITM "
                     "negative is another example of its batch")


# The random-number implementations a run's key may use (`train.rng`): JAX's default,
# threefry (counter-based hashing; dropout's masks hash it in-line, fused with the kernels
# that apply them, `layers.keep_mask`), or XLA's RngBitGenerator ("rbg": Philox on a GPU, a
# kernel of its own; "unsafe_rbg" also derives keys with it). The draws (dropout's masks,
# the ITM negatives) differ between them, and the rbg ones may differ between devices,
# device counts and XLA versions.
RNG_IMPLS = {"threefry": "threefry2x32", "rbg": "rbg", "unsafe_rbg": "unsafe_rbg"}


def check_values(config) -> None:
  """Refuses, naming each flag, values that would train something other than was asked
  (a negative loss weight dropped the term, a weight naming no term, e.g. misspelt in a
  config file, was ignored, a label smoothing over 1 trained on negative targets, epsilon 0
  made the OT loss 0), leave no learning signal (answers cut to their special tokens), or fail
  later inside a library, some after the run folder was written."""
  mc, lc = config.model, config.get("losses")
  at_least = lambda low: (lambda v: v >= low, f"{low} or more")
  rules = [
      ("seed", config.seed, lambda v: 0 <= v < 2 ** 32, "a whole number in [0, 2**32)"),
      ("train.epochs", config.train.get("epochs") or 0, *at_least(0)),
      ("model.dropout", mc.dropout, lambda v: 0 <= v < 1, "in [0, 1)"),
      ("model.dtype", mc.dtype, lambda v: v in ("float32", "bfloat16", "float16"),
       "float32, bfloat16 or float16"),
      ("model.text.max_len", mc.text.max_len, lambda v: v >= 2,
       "2 or more (a start and an end token)"),
      ("model.prior_max_tokens", mc.prior_max_tokens, *at_least(1)),
  ]
  if mc.head == "generative":
    rules.append(("model.answer_max_len", mc.answer_max_len, lambda v: v >= 3,
                  "3 or more ([CLS], a word piece, [SEP]): shorter, every answer is its "
                  "special tokens alone and the decoder learns nothing"))
    rules.append(("model.rank_score", mc.get("rank_score", "likelihood"),
                  lambda v: v in RANK_SCORES, f"one of {', '.join(RANK_SCORES)}"))
  if lc is not None:
    rules += [(f"losses.weights.{name}", weight, lambda v: v >= 0, "0 or more (0 leaves the "
               "term out)") for name, weight in lc.weights.items()]
    rules += [(f"losses.weights.{name}", weight, lambda v, name=name: name in TERMS,
               f"the weight of a loss term, and there is no term {name!r} (terms: "
               f"{', '.join(TERMS)}; a new one is listed in losses/pretrain.py TERMS)")
              for name, weight in lc.weights.items()]
    rules += [
        ("losses.lam", lc.lam, *at_least(0)),
        ("losses.label_smoothing", lc.label_smoothing, lambda v: 0 <= v < 1, "in [0, 1)"),
        ("losses.ot.solver", lc.ot.solver, lambda v: v in ("sinkhorn", "ipot"),
         "'sinkhorn' or 'ipot'"),
        ("losses.ot.epsilon", lc.ot.epsilon, lambda v: v > 0,
         "above 0 (at 0 the plan, and the loss, are 0)"),
        ("losses.ot.max_iterations", lc.ot.max_iterations, *at_least(1)),
        ("losses.ot.ipot_beta", lc.ot.ipot_beta, lambda v: v > 0, "above 0"),
        ("losses.ot.ipot_iterations", lc.ot.ipot_iterations, *at_least(1)),
    ]
  bad = [f"--config.{flag}={value!r}: must be {need}" for flag, value, ok, need in rules
         if not ok(value)]
  if bad:
    raise ValueError("; ".join(bad))


def check_rng(rng: str) -> str:
  """`rng` if it names an implementation of RNG_IMPLS; an error naming them otherwise."""
  if rng not in RNG_IMPLS:
    raise ValueError(f"unknown train.rng {rng!r}; expected one of {sorted(RNG_IMPLS)}")
  return rng


def base_key(seed: int, rng: str = "threefry", mesh=None):
  """The run's random key as raw key data (uint32; threefry's is `PRNGKey(seed)`), replicated
  over `mesh`: a host array put on the devices as before `train.rng` existed (a typed key
  cannot be put on devices other processes hold). `make_train_step(rng=...)` wraps it as a
  key of that implementation, then folds the step number into it."""
  data = np.asarray(jax.random.key_data(jax.random.key(seed, impl=RNG_IMPLS[check_rng(rng)])))
  return data if mesh is None else jax.device_put(data, NamedSharding(mesh, P()))


def as_key(key, rng: str = "threefry"):
  """A typed key of implementation `rng` from raw key data (a typed key is returned as is)."""
  if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key, impl=RNG_IMPLS[rng])


def micro_batches(batch: dict, accum_steps: int) -> dict:
  """Arrays of shape (accum_steps, B / accum_steps, ...): micro-batch i is rows i,
  i + accum_steps, ... of the batch. The batch is sharded by rows, so every device holds its
  share of every micro-batch and no rows move between devices (consecutive slices would put
  each micro-batch on a fraction of the devices and gather it there)."""
  return {k: jnp.swapaxes(v.reshape(-1, accum_steps, *v.shape[1:]), 0, 1)
          for k, v in batch.items()}


class TrainStep:
  """The jitted step (`make_train_step`) with the optimizer's schedule numbers bound: called
  and lowered with (state, batch, key). Its program takes the numbers as its last argument
  (`hyper`, put on the devices at the first call), so that a program compiled with other
  numbers (another run length or learning rate) is the same program: a compiled one of
  `lower(...).compile()` is called with (state, batch, key, step.hyper)."""

  def __init__(self, jitted, hyper: dict, sharding):
    self.jitted, self._hyper, self._sharding, self._placed = jitted, hyper, sharding, None

  @property
  def hyper(self):
    if self._placed is None:
      self._placed = jax.device_put(self._hyper, self._sharding)
    return self._placed

  def __call__(self, state, batch, key):
    return self.jitted(state, batch, key, self.hyper)

  def lower(self, state, batch, key):
    # Shapes only: a step compiled for devices that are not here (aot.py) places nothing.
    hyper = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype,
                                                        sharding=self._sharding), self._hyper)
    return self.jitted.lower(state, batch, key, hyper)


def make_train_step(objective: Callable, tx, shardings, accum_steps: int = 1, frozen=None,
                    rng: str = "threefry", compiler_options: dict | None = None) -> TrainStep:
  """(state, batch, key) -> (state, metrics), jitted with the state donated. The loss and
  gradients are those of the whole global batch (micro-batches weighted by the examples
  their loss is a mean over, `EXAMPLES`: exact for a loss that is a mean over examples, such
  as fine-tuning's; `check_batch` refuses accumulation for pre-training); the step's random
  key is `key` (raw key data, `base_key`'s, wrapped as a key of implementation `rng`)
  folded with the state's step.

  tx: `optim.make`'s Optimizer (the step builds it from its schedule numbers, an argument of
  the program: `TrainStep`), or an optax transformation (compiled in as it is).

  frozen: a pytree like the params of bools (optim.frozen_mask): those parameters enter the
  objective through stop_gradient, so their gradients are zeros and nothing is computed for
  them (stage 1's frozen towers cost their forward pass only).

  compiler_options: XLA's, for the step (`determinism.compiler_options`).
  """

  # FSDP: the objective sees the parameters gathered; their gradients are summed over the
  # devices and each keeps its shard's (compiled for 8 H200s, XLA makes most of that sum an
  # all-reduce of whole gradients, not a reduce-scatter: BENCHMARKS.md); the state stays
  # sharded.
  optimizer = optim.as_optimizer(tx)
  plain, mesh = freeze(objective, frozen), shardings["step"].mesh
  replicated = NamedSharding(mesh, P())
  differentiated = lambda params, batch, key: plain(sharding.gathered(params, mesh), batch, key)

  def grads_of(params, batch, key):
    return jax.value_and_grad(differentiated, has_aux=True)(params, batch, key)

  def step(state, batch, key, hyper):
    tx = optimizer.build(hyper)
    params = state["params"]
    # A fresh key per step, made on device, of the run's implementation (train.rng).
    key = jax.random.fold_in(as_key(key, rng), state["step"])
    if accum_steps == 1:
      (_, metrics), grads = grads_of(params, batch, key)
      metrics.pop(EXAMPLES, None)
    else:
      # Scalars (e.g. the teacher's logit scale) are shared; arrays split into micro-batches.
      consts = {k: v for k, v in batch.items() if jnp.ndim(v) == 0}
      micro = micro_batches({k: v for k, v in batch.items() if jnp.ndim(v) > 0}, accum_steps)
      keys = jax.random.split(key, accum_steps)
      first = jax.tree.map(lambda x: x[0], micro)
      (_, metric_shapes), grad_shapes = jax.eval_shape(grads_of, params, {**first, **consts}, key)
      metric_shapes.pop(EXAMPLES, None)
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), (grad_shapes, metric_shapes))

      def body(carry, inputs):
        # Each micro-batch's mean counts by its examples: the sum over micro-batches of
        # examples x mean, over the total of examples, is the mean over the whole batch.
        sums, total = carry
        mb, k = inputs
        (_, m), g = grads_of(params, {**mb, **consts}, k)
        n = jnp.asarray(m.pop(EXAMPLES, 1), jnp.float32)
        sums = jax.tree.map(lambda s, x: s + (n * x).astype(s.dtype), sums, (g, m))
        return (sums, total + n), None

      ((grads, metrics), total), _ = jax.lax.scan(body, (zeros, jnp.zeros((), jnp.float32)),
                                                  (micro, keys))
      # No example counted (none in the vocabulary): the sums are zeros and stay so.
      total = jnp.maximum(total, 1.0)
      grads, metrics = jax.tree.map(lambda x: (x / total).astype(x.dtype), (grads, metrics))
    updates, opt_state = tx.update(grads, state["opt_state"], params)
    metrics = dict(metrics, grad_norm=_tree_norm(grads))
    new = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
           "step": state["step"] + 1}
    return new, metrics

  jitted = jax.jit(step, in_shardings=(shardings, None, replicated, replicated),
                   out_shardings=(shardings, replicated), donate_argnums=(0,),
                   compiler_options=compiler_options or None)
  return TrainStep(jitted, optimizer.hyper, replicated)
