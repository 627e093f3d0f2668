"""Optimizer from the config: AdamW with warm-up + cosine decay, per-parameter learning-rate
multipliers by path regex, and freezing (multiplier 0) as an optimizer mask.

    optim.lr_mults = (("image/.*", 0.0), ("text/.*", 0.0))   # stage 1: encoders frozen

The first rule whose regex fully matches a parameter path ("image/block_0/attn/query/kernel")
applies; unmatched parameters train at the base rate; a rule that matches no parameter, or
only parameters that an earlier rule takes, is refused (a typo would otherwise train what it
meant to freeze). Frozen parameters get zero updates and hold no optimizer state. Weight decay
applies to every trained parameter (LayerNorm scales, biases, embeddings and temperatures
included), as the reference's AdamW over all of its parameters does. The temperatures are
stored as log t, so decay pulls them towards t = 1 where a decayed t would go towards 0: with
no gradient, a drift of a few percent over a run (0.07 to about 0.072 over 10,000 steps at
lr 1e-4, weight decay 0.02).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from medvqa_jax.models.state_dict import flatten, unflatten


def _first_rule(path: str, rules) -> int | None:
  return next((i for i, (pattern, _) in enumerate(rules) if re.fullmatch(pattern, path)), None)


def param_labels(params, rules):
  """A pytree like `params` of labels "frozen" or "lr_x<multiplier>"."""
  paths = list(flatten(params))
  unused = [pattern for pattern, _ in rules if not any(re.fullmatch(pattern, p) for p in paths)]
  if unused:
    tops = sorted({p.split("/")[0] for p in paths})
    raise ValueError(f"optim.lr_mults: {unused} match no parameter path; paths start with "
                     f"{tops} (e.g. {paths[0]!r}) and a rule must match a whole path")
  # A rule whose every path an earlier rule takes first applies nowhere, as silently as one
  # that matches nothing ("image/ln/.*" after "image/.*").
  first = {p: _first_rule(p, rules) for p in paths}
  shadowed = []
  for i, (pattern, _) in enumerate(rules):
    if i not in first.values():
      path = next(p for p in paths if re.fullmatch(pattern, p))
      shadowed.append(f"{pattern!r} applies to no parameter: the paths it matches (e.g. "
                      f"{path!r}) match {rules[first[path]][0]!r} before it")
  if shadowed:
    raise ValueError(f"optim.lr_mults: {'; '.join(shadowed)} (the first rule that matches a "
                     "path applies: put the narrower rule first)")
  mult = {p: 1.0 if i is None else float(rules[i][1]) for p, i in first.items()}
  labels = {p: "frozen" if m == 0 else f"lr_x{m:g}" for p, m in mult.items()}
  # The optimizer groups parameters by label: multipliers that print alike would train at one.
  by_label = {}
  for p, label in labels.items():
    by_label.setdefault(label, set()).add(mult[p])
  alike = sorted(sorted(m) for m in by_label.values() if len(m) > 1)
  if alike:
    raise ValueError(f"optim.lr_mults: the multipliers {alike[0]} differ only past 6 "
                     "significant digits: make them equal, or differ sooner")
  return unflatten(labels)


def frozen_mask(cfg, params):
  """A pytree like `params` of bools: True where the learning-rate multiplier is 0."""
  return jax.tree.map(lambda label: label == "frozen", param_labels(params, cfg.lr_mults))


def hyperparameters(cfg) -> dict:
  """The numbers of the learning-rate schedule: optim.lr ("lr"), the warm-up's length in
  steps ("warmup": warmup_fraction of total_steps, at least one step and one below
  total_steps where the run has two or more; 0 without warm-up) and the cosine decay's
  ("decay": the rest of the run, at least 1). The train step takes them as an argument
  (`Optimizer.hyper`): runs that differ in these alone (a resumed run given more steps, a
  learning-rate sweep) run one compiled step."""
  if not cfg.total_steps or cfg.total_steps < 1:
    raise ValueError(f"the run has {cfg.total_steps} steps: set --config.optim.total_steps to "
                     "1 or more (or --config.train.epochs, where the config counts in epochs)")
  if not 0 <= cfg.warmup_fraction < 1:
    raise ValueError(f"optim.warmup_fraction={cfg.warmup_fraction}: the share of the run spent "
                     "warming up, at least 0 and below 1 (a share of 1 or more never reaches "
                     "optim.lr)")
  warmup = max(int(cfg.warmup_fraction * cfg.total_steps), 1) if cfg.warmup_fraction else 0
  return {"lr": np.float32(cfg.lr), "warmup": np.int32(warmup),
          "decay": np.int32(max(cfg.total_steps, warmup + 1) - warmup)}


def schedule(cfg=None, hyper: dict | None = None):
  """The learning rate by step count: a linear warm-up from 0 over `warmup` steps, then a
  cosine decay to 0 over `decay` steps; without warm-up (0), the cosine decay from optim.lr.
  Step s (1-based) takes the rate at count s - 1, as Hugging Face's schedulers give it: a
  warm-up's first step moves nothing but Adam's moments. The numbers are `hyper`'s (arrays,
  traced in the train step) or else the config's (`hyperparameters(cfg)`). The formula is
  optax's `warmup_cosine_decay_schedule` (to 0) and `cosine_decay_schedule` (without warm-up),
  written on arrays: optax's take Python numbers."""
  h = hyperparameters(cfg) if hyper is None else hyper
  lr, warmup, decay = h["lr"], h["warmup"], h["decay"]

  def rate(count):
    rising = jnp.clip(count, 0, warmup) / jnp.maximum(warmup, 1)
    up = (0.0 - lr) * (1 - rising) + lr
    after = jnp.minimum(count - warmup, decay)
    down = lr * (0.5 * (1 + jnp.cos(jnp.pi * after / decay)))
    return jnp.where(count < warmup, up, down)
  return rate


@dataclasses.dataclass(frozen=True, eq=False)
class Optimizer:
  """`make`'s optimizer: `build(hyper)` is the optax transformation for the schedule's numbers
  `hyper` (`hyperparameters`), which the train step takes as an argument and builds it from
  inside its trace. Used as an optax transformation itself (`init`, `update`), it has the
  config's numbers compiled in. Only the schedule changes with `hyper`: the state's structure
  does not."""
  build: Callable[[dict], optax.GradientTransformation]
  hyper: dict

  def init(self, params):
    return self.build(self.hyper).init(params)

  def update(self, updates, state, params=None):
    return self.build(self.hyper).update(updates, state, params)


def as_optimizer(tx) -> Optimizer:
  """`tx` if an Optimizer; an optax transformation as one with no numbers to take."""
  return tx if isinstance(tx, Optimizer) else Optimizer(lambda hyper: tx, {})


def make(cfg, params) -> Optimizer:
  """cfg: lr, weight_decay, b1, b2, warmup_fraction, total_steps, lr_mults, grad_clip."""
  # A negative learning rate (or multiplier, or clipping norm, which flips the gradient)
  # would train towards a higher loss without a complaint.
  negative = [f"optim.lr={cfg.lr}"] if cfg.lr < 0 else []
  negative += [f"optim.lr_mults: {pattern!r} x {mult}" for pattern, mult in cfg.lr_mults
               if mult < 0]
  if cfg.get("grad_clip") is not None and cfg.grad_clip < 0:
    negative.append(f"optim.grad_clip={cfg.grad_clip}")
  if negative:
    raise ValueError(f"{', '.join(negative)}: learning rates, their multipliers and the "
                     "clipping norm must not be negative (a multiplier of 0 freezes)")
  # A negative decay grows the weights; a decay rate of 1 divides by 0 (NaN parameters).
  bad = [f"optim.weight_decay={cfg.weight_decay}: must be 0 or more"] \
      if cfg.weight_decay < 0 else []
  bad += [f"optim.{name}={cfg[name]}: must be in [0, 1)" for name in ("b1", "b2")
          if not 0 <= cfg[name] < 1]
  if bad:
    raise ValueError("; ".join(bad))
  labels = param_labels(params, cfg.lr_mults)
  # Each label's multiplier as given (its label prints 6 digits; param_labels refuses two
  # that print alike).
  given = {f"lr_x{float(m):g}": float(m) for _, m in cfg.lr_mults}
  # Frozen gradients are zeroed first, so that they do not count in the clipping norm (the
  # train step does not compute them at all: see step.make_train_step's `frozen`).
  frozen = jax.tree.map(lambda label: label == "frozen", labels)
  clip = [optax.clip_by_global_norm(cfg.grad_clip)] if cfg.get("grad_clip") else []

  def build(hyper):
    base = schedule(hyper=hyper)
    transforms = {"frozen": optax.set_to_zero()}
    for label in set(jax.tree.leaves(labels)) - {"frozen"}:
      mult = given.get(label, 1.0)
      transforms[label] = optax.adamw(lambda step, mult=mult: mult * base(step), b1=cfg.b1,
                                      b2=cfg.b2, weight_decay=cfg.weight_decay)
    return optax.chain(optax.masked(optax.set_to_zero(), frozen), *clip,
                       optax.multi_transform(transforms, labels))
  return Optimizer(build, hyperparameters(cfg))
