"""Global alignment losses over the whole (global) batch.

Soft-label contrastive loss (the paper's itgc / imvc / utgc):

    KL( softmax(s * T + lambda * I)  ||  softmax(S / tau) )        row-wise, averaged

with S the student's cosine similarities, T the frozen teacher's, s the teacher's logit scale,
lambda the flexibility weight that tilts each row's target towards its positive, and tau a
learnable temperature. Hard-label InfoNCE (optionally label-smoothed) is the ablation used
when no teacher is configured. Every function takes L2-normalised embeddings of the global
batch: written on global arrays, the partitioner inserts the collectives, and the identity
that marks positives is over global indices.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Similarities in true float32. Left to JAX's default, a float32 product is computed in
# bfloat16 passes on TPUs and in TF32 on recent GPUs: with the teacher's logit scale (~85),
# its rounding (a few hundredths of a logit) would drown the lambda = 0.01 tilt of the
# targets. These (N, N) products cost nothing next to the towers.
HIGHEST = jax.lax.Precision.HIGHEST


def similarity(a, b):
  """a @ b.T in float32, at full precision on every device."""
  return jnp.matmul(a.astype(jnp.float32), b.astype(jnp.float32).T, precision=HIGHEST)


def _rows_kl(target_logits, logits):
  """Mean over rows of KL(softmax(target_logits) || softmax(logits))."""
  target_logp = jax.nn.log_softmax(target_logits, axis=-1)
  logp = jax.nn.log_softmax(logits, axis=-1)
  return jnp.mean(jnp.sum(jnp.exp(target_logp) * (target_logp - logp), axis=-1))


def soft_label_loss(a, b, teacher_a, teacher_b, teacher_scale, temperature, lam=0.01,
                    symmetric=True):
  """Soft-label contrastive loss between the rows of `a` and `b` (N, D), both directions
  averaged when `symmetric`. The teacher embeddings (N, Dt) give the targets."""
  sim = similarity(a, b) / temperature
  teacher = teacher_scale * similarity(teacher_a, teacher_b)
  eye = lam * jnp.eye(sim.shape[0], dtype=jnp.float32)
  loss = _rows_kl(teacher + eye, sim)
  if symmetric:
    loss = 0.5 * (loss + _rows_kl(teacher.T + eye, sim.T))
  return loss


def info_nce(a, b, temperature, label_smoothing=0.0, symmetric=True):
  """Hard-label InfoNCE: the positive of row i is column i."""
  sim = similarity(a, b) / temperature
  n = sim.shape[0]
  target = (1 - label_smoothing) * jnp.eye(n) + label_smoothing / n

  def ce(logits):
    return jnp.mean(-jnp.sum(target * jax.nn.log_softmax(logits, axis=-1), axis=-1))

  return 0.5 * (ce(sim) + ce(sim.T)) if symmetric else ce(sim)


def global_losses(student: dict, teacher: dict | None, temperatures: dict, lam: float,
                  label_smoothing: float = 0.0) -> dict:
  """itgc (image<->text), imvc (view 1 <-> view 2, when a second view is given) and utgc
  (text<->text) from student and teacher embeddings {"image", "image2", "text"}. With no
  teacher, hard-label InfoNCE for itgc and imvc (utgc has no hard-label form: a text's only
  positive is itself)."""
  out = {}
  pairs = {"itgc": ("image", "text", True), "imvc": ("image", "image2", True),
           "utgc": ("text", "text", False)}
  for name, (x, y, symmetric) in pairs.items():
    if x not in student or y not in student:
      continue
    tau = temperatures[name]
    if teacher is not None:
      out[name] = soft_label_loss(student[x], student[y], teacher[x], teacher[y],
                                  teacher["scale"], tau, lam, symmetric)
    elif name != "utgc":
      out[name] = info_nce(student[x], student[y], tau, label_smoothing, symmetric)
  return out
