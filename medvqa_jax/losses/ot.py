"""Word-patch alignment by optimal transport (`wpa`).

For each matched pair, the cost between every real text token (CLS and SEP/end-of-text left
out) and every image patch (CLS left out) is C = 1 - cos(text token, image patch); the plan P
has uniform marginals over the real tokens, and the loss is <C, P> with P held constant
(gradients flow through C only). Solved by entropic OT with OTT-JAX's Sinkhorn, batched with
vmap, or by IPOT (the reference's solver) for comparison. Both run in float32: Sinkhorn in
bfloat16 does not converge.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from medvqa_jax.models import layers

# The cost and IPOT's products in true float32 (JAX's default rounds float32 products to
# bfloat16 passes on TPUs, TF32 on recent GPUs).
HIGHEST = jax.lax.Precision.HIGHEST

# Padded tokens get this much marginal mass instead of zero: zero makes the log-domain
# solver produce -inf/NaN. Their entries are left out of the loss.
PAD_WEIGHT = 1e-6


def token_masks(text_mask, num_image_tokens: int):
  """Masks of the tokens that take part: text without CLS (first) and SEP (last real
  token); image without CLS."""
  text_mask = text_mask.astype(bool)
  last = jnp.sum(text_mask, axis=-1) - 1
  pos = jnp.arange(text_mask.shape[-1])
  text = text_mask & (pos[None] > 0) & (pos[None] != last[:, None])
  image = jnp.broadcast_to(jnp.arange(num_image_tokens)[None] > 0,
                           (text_mask.shape[0], num_image_tokens))
  return text, image


def cosine_cost(text, image):
  """1 - cos between every text token and every image token: (B, Lt, Li), float32."""
  text, image = layers.l2_normalize(text, 1e-6), layers.l2_normalize(image, 1e-6)
  return 1.0 - jnp.einsum("btd,bid->bti", text, image, precision=HIGHEST)


def marginal(mask):
  w = jnp.where(mask, 1.0, PAD_WEIGHT)
  return w / jnp.sum(w, axis=-1, keepdims=True)


def sinkhorn_plan(cost, a, b, epsilon: float, max_iterations: int, threshold: float,
                  min_iterations: int = 0):
  """Entropic OT plans for a batch: (B, n, m) costs, (B, n) and (B, m) marginals.
  Returns (plans, converged (B,)).

  min_iterations == max_iterations runs exactly that many iterations (a `lax.scan`, no
  convergence test); otherwise the loop stops at the threshold or max_iterations."""
  from ott.geometry import geometry
  from ott.problems.linear import linear_problem
  from ott.solvers.linear import sinkhorn
  if not 0 <= min_iterations <= max_iterations or max_iterations < 1:
    raise ValueError(f"losses.ot: Sinkhorn needs 1 <= max_iterations and 0 <= min_iterations "
                     f"<= max_iterations, not min_iterations={min_iterations}, "
                     f"max_iterations={max_iterations}")
  # OTT iterates in chunks of `inner_iterations` (default 10), testing convergence after each:
  # a budget that is not a multiple of the chunk was rounded (a fixed one down, to no iteration
  # at all below 10, while its error was never measured and so read as converged; a loop's up).
  # A chunk that divides the budget keeps it exact; 10 whenever the budget allows.
  solver = sinkhorn.Sinkhorn(threshold=threshold, max_iterations=max_iterations,
                             min_iterations=min_iterations,
                             inner_iterations=math.gcd(max_iterations, 10),
                             # The plan is held constant, so the solver is never
                             # differentiated: no implicit differentiation.
                             implicit_diff=None)

  def solve(c, a, b):
    out = solver(linear_problem.LinearProblem(geometry.Geometry(cost_matrix=c, epsilon=epsilon),
                                              a=a, b=b))
    return out.matrix, out.converged

  return jax.vmap(solve)(cost, a, b)


def ipot_plan(cost, text_mask, image_mask, beta: float = 0.5, iterations: int = 50,
              inner: int = 1):
  """IPOT (inexact proximal point OT) plans, the reference's solver: uniform marginals over
  the real tokens, padded rows and columns carry no mass."""
  tm, im = text_mask.astype(jnp.float32), image_mask.astype(jnp.float32)
  n = jnp.sum(tm, axis=-1, keepdims=True)
  m = jnp.sum(im, axis=-1, keepdims=True)
  kernel = jnp.exp(-cost / beta) * tm[:, :, None] * im[:, None, :]
  safe = lambda num, den: jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)

  # In the reference's order: the image scaling (delta) first, then the text scaling
  # (sigma), so the text marginal is the one met exactly after each iteration.
  def step(carry, _):
    plan, sigma = carry
    q = kernel * plan
    for _ in range(inner):
      delta = safe(im / m, jnp.einsum("bnm,bn->bm", q, sigma, precision=HIGHEST))
      sigma = safe(tm / n, jnp.einsum("bnm,bm->bn", q, delta, precision=HIGHEST))
    return (sigma[:, :, None] * q * delta[:, None, :], sigma), None

  init = (jnp.ones_like(cost) * tm[:, :, None] * im[:, None, :], tm / n)
  (plan, _), _ = jax.lax.scan(step, init, None, length=iterations)
  return plan


def wpa_loss(fused_text, fused_image, text_mask, solver: str = "sinkhorn",
             epsilon: float = 0.1, max_iterations: int = 100, threshold: float = 1e-3,
             min_iterations: int = 0, ipot_beta: float = 0.5, ipot_iterations: int = 50):
  """Mean of <C, P> over the pairs whose caption has a real token (one of only CLS and SEP has
  nothing to align); returns (loss, metrics) with the Sinkhorn convergence rate."""
  text_ok, image_ok = token_masks(text_mask, fused_image.shape[1])
  cost = cosine_cost(fused_text, fused_image)
  pair_ok = (text_ok[:, :, None] & image_ok[:, None, :]).astype(jnp.float32)
  const_cost = jax.lax.stop_gradient(cost)
  metrics = {}
  if solver == "sinkhorn":
    plan, converged = sinkhorn_plan(const_cost, marginal(text_ok), marginal(image_ok), epsilon,
                                    max_iterations, threshold, min_iterations)
    metrics["wpa_converged"] = jnp.mean(converged.astype(jnp.float32))
  elif solver == "ipot":
    plan = ipot_plan(const_cost, text_ok, image_ok, ipot_beta, ipot_iterations)
  else:
    raise ValueError(f"unknown OT solver {solver!r}; expected 'sinkhorn' or 'ipot'")
  plan = jax.lax.stop_gradient(plan)
  has_text = jnp.any(text_ok, axis=-1).astype(jnp.float32)
  per_pair = jnp.sum(cost * plan * pair_ok, axis=(1, 2))
  loss = jnp.sum(per_pair * has_text) / jnp.maximum(jnp.sum(has_text), 1.0)
  return loss, metrics
