"""The optimizer's parameter groups: learning-rate multipliers and freezing by path regex."""

import jax
import jax.numpy as jnp
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


def test_a_rule_that_earlier_rules_leave_nothing_to_is_refused():
  # "text/ln/.*" after "text/.*" applied to nothing: text/ln/scale trained at 0.1, silently.
  with pytest.raises(ValueError, match=r"'text/ln/\.\*' applies to no parameter: the paths it "
                                       r"matches \(e.g. 'text/ln/scale'\) match 'text/\.\*' "
                                       r"before it .*put the narrower rule first"):
    optim.param_labels(PARAMS, ((r"text/.*", 0.1), (r"text/ln/.*", 0.5)))
  # Narrower first, each rule applies somewhere: accepted.
  labels = optim.param_labels(PARAMS, ((r"text/ln/.*", 0.5), (r"text/.*|image/.*", 0.1)))
  assert labels["text"]["ln"]["scale"] == "lr_x0.5"
  assert labels["image"]["block_0"]["kernel"] == "lr_x0.1"


def test_multipliers_that_print_alike_are_refused():
  # The optimizer groups parameters by label: both trained at 0.123456.
  with pytest.raises(ValueError, match=r"the multipliers \[0.1234561, 0.1234564\] differ only "
                                       r"past 6 significant digits"):
    optim.param_labels(PARAMS, ((r"text/.*", 0.1234561), (r"image/.*", 0.1234564)))
  # Equal multipliers share a group, as the base rate does with a rule of 1.
  labels = optim.param_labels(PARAMS, ((r"text/.*", 0.25), (r"image/.*", 0.25),
                                       (r"fusion/.*", 1.0)))
  assert set(jax.tree.leaves(labels)) == {"lr_x0.25", "lr_x1"}


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


def test_schedule_is_linear_warmup_then_cosine_to_zero():
  cfg = _cfg(())
  cfg.update(lr=3e-3, warmup_fraction=0.25, total_steps=20)  # 5 warm-up steps.
  lr = optim.schedule(cfg)
  w, total, peak = 5, 20, 3e-3
  steps = np.array([0, 1, 2, 4, 5, 6, 9, 12, 17, 19, 20, 30])
  frac = np.clip((steps - w) / (total - w), 0, 1)
  expected = np.where(steps < w, peak * steps / w, peak * 0.5 * (1 + np.cos(np.pi * frac)))
  np.testing.assert_allclose([float(lr(s)) for s in steps], expected, rtol=1e-6, atol=1e-9)


def test_the_shortest_runs_have_a_schedule_and_none_is_refused_by_name():
  # One or two steps (a smoke run): a warm-up step, then the rest (optax refused one step:
  # "positive decay_steps").
  for total in (1, 2):
    cfg = _cfg(())
    cfg.update(warmup_fraction=0.4, total_steps=total)
    lr = optim.schedule(cfg)
    assert float(lr(0)) == 0.0 and float(lr(1)) == pytest.approx(1e-3)
  # Without warm-up the first step is at optim.lr (it was a warm-up step at 0: a one-step run
  # trained nothing), and the rate falls by a cosine to 0 at total_steps.
  for total in (1, 4):
    cfg = _cfg(())
    cfg.update(warmup_fraction=0.0, total_steps=total)
    lr = optim.schedule(cfg)
    np.testing.assert_allclose([float(lr(s)) for s in range(total + 1)],
                               1e-3 * 0.5 * (1 + np.cos(np.pi * np.arange(total + 1) / total)),
                               rtol=1e-6, atol=1e-12)
  for total in (0, None):
    cfg = _cfg(())
    cfg.total_steps = total
    with pytest.raises(ValueError, match=r"set --config.optim.total_steps to 1 or more"):
      optim.schedule(cfg)


@pytest.mark.parametrize("lr,fraction,total", [(3e-3, 0.25, 20), (2e-5, 0.06, 2150),
                                               (1e-3, 0.4, 1), (1e-3, 0.4, 2), (3e-4, 0.0, 10),
                                               (1e-3, 0.0, 1), (0.0, 0.1, 10)])
def test_the_schedule_of_traced_numbers_is_optax_s(lr, fraction, total):
  """The train step computes the rate from its schedule numbers, arguments of its program:
  bit for bit optax's schedules of Python numbers (the formula the step compiled in before),
  at every count of the run and past its end."""
  cfg = _cfg(())
  cfg.update(lr=lr, warmup_fraction=fraction, total_steps=total)
  if fraction:
    warmup = max(int(fraction * total), 1)
    reference = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(total, warmup + 1), 0.0)
  else:
    reference = optax.cosine_decay_schedule(lr, total)
  counts = np.arange(total + 3, dtype=np.int32)
  expected = jax.jit(jax.vmap(reference))(counts)
  got = jax.jit(lambda hyper, n: jax.vmap(optim.schedule(hyper=hyper))(n))(
      optim.hyperparameters(cfg), counts)
  np.testing.assert_array_equal(got, expected)
  assert np.any(np.asarray(got)) == bool(lr)  # Not a comparison of zeros.


def test_runs_of_other_schedule_numbers_run_one_compiled_step():
  """Two runs that differ in optim.lr, total_steps and warmup_fraction lower to the same
  program (a resumed run given more steps, or a learning-rate sweep, compiles nothing new),
  and each trains at its own rate: its parameters are optax.adamw's under its schedule."""
  from medvqa_jax.train import sharding
  from medvqa_jax.train import step as step_lib
  params = {"w": np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)}
  batch = {"x": np.arange(6, dtype=np.float32).reshape(2, 3) / 5}
  objective = lambda p, b, key: (jnp.sum((p["w"] - b["x"]) ** 2), {})
  mesh = sharding.make_mesh(1, devices=jax.devices()[:1])
  runs = []
  for lr, fraction, total in ((1e-2, 0.25, 8), (3e-2, 0.0, 20)):
    cfg = _cfg(())
    cfg.update(lr=lr, warmup_fraction=fraction, total_steps=total, weight_decay=0.1)
    tx = optim.make(cfg, params)
    shardings = step_lib.state_shardings(mesh, params, tx, min_size=64)
    train_step = step_lib.make_train_step(objective, tx, shardings)
    state = step_lib.init_state(params, tx, shardings)
    key = step_lib.base_key(0, mesh=mesh)
    text = train_step.lower(state, batch, key).as_text()
    for _ in range(3):
      state, _ = train_step(state, batch, key)
    # optax's own AdamW under optax's schedule, the rate compiled in.
    if fraction:
      rate = optax.warmup_cosine_decay_schedule(0.0, lr, 2, total, 0.0)
    else:
      rate = optax.cosine_decay_schedule(lr, total)
    reference = optax.adamw(rate, b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay)
    p, s = params, reference.init(params)
    for _ in range(3):
      grads = jax.grad(lambda p: objective(p, batch, None)[0])(p)
      updates, s = jax.jit(reference.update)(grads, s, p)
      p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(state["params"]["w"], p["w"], rtol=1e-6, atol=1e-7)
    assert np.max(np.abs(np.asarray(state["params"]["w"]) - params["w"])) > 1e-3
    runs.append((text, np.asarray(state["params"]["w"])))
  assert runs[0][0] == runs[1][0]
  assert not np.allclose(runs[0][1], runs[1][1])


def _numpy_adamw(params, grads_per_step, mults, lr, b1, b2, wd, clip, eps=1e-8):
  """AdamW as optax.adamw applies it (decoupled decay, scaled by the scheduled rate), with a
  per-leaf rate multiplier (0: frozen, no state, no decay), after a global-norm clip over the
  trained leaves' gradients. float64 throughout."""
  p = {k: np.asarray(v, np.float64) for k, v in params.items()}
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v = {k: np.zeros_like(x) for k, x in p.items()}
  for t, grads in enumerate(grads_per_step):
    g = {k: np.asarray(x, np.float64) * (mults[k] != 0) for k, x in grads.items()}
    norm = np.sqrt(sum(np.sum(x ** 2) for x in g.values()))
    if clip and norm > clip:
      g = {k: x * clip / norm for k, x in g.items()}
    for k in p:
      if mults[k] == 0:
        continue
      m[k] = b1 * m[k] + (1 - b1) * g[k]
      v[k] = b2 * v[k] + (1 - b2) * g[k] ** 2
      m_hat, v_hat = m[k] / (1 - b1 ** (t + 1)), v[k] / (1 - b2 ** (t + 1))
      p[k] = p[k] - mults[k] * lr(t) * (m_hat / (np.sqrt(v_hat) + eps) + wd * p[k])
  return p


@pytest.mark.parametrize("grad_clip", [None, 1.0])
def test_updates_equal_numpy_adamw_with_multipliers_freezing_and_clipping(grad_clip):
  rng = np.random.default_rng(0)
  leaves = {"image/block_0/kernel": (3, 2), "text/ln/scale": (4,), "text/ln/bias": (4,),
            "fusion/kernel": (3, 4), "fusion/bias": (4,)}
  # 0.12345649: its group's label prints 0.123456, and the step took that (4e-6 less).
  mults = {"image/block_0/kernel": 0.0, "text/ln/scale": 0.12345649, "text/ln/bias": 1.0,
           "fusion/kernel": 1.0, "fusion/bias": 0.5}
  flat = {k: rng.normal(size=s).astype(np.float32) for k, s in leaves.items()}
  flat["text/ln/bias"] = flat["text/ln/scale"].copy()  # Same values and gradients: x m vs x1.
  nest = lambda f: {"image": {"block_0": {"kernel": f["image/block_0/kernel"]}},
                    "text": {"ln": {"scale": f["text/ln/scale"], "bias": f["text/ln/bias"]}},
                    "fusion": {"kernel": f["fusion/kernel"], "bias": f["fusion/bias"]}}
  unnest = lambda t: {"image/block_0/kernel": t["image"]["block_0"]["kernel"],
                      "text/ln/scale": t["text"]["ln"]["scale"],
                      "text/ln/bias": t["text"]["ln"]["bias"],
                      "fusion/kernel": t["fusion"]["kernel"], "fusion/bias": t["fusion"]["bias"]}
  # Gradient norms far below and far above the clip (about 0.1 and 30), so the clip both
  # triggers and leaves some steps alone, and Adam's per-step normalisation cannot hide it.
  # The frozen leaf's large gradient must not count in the norm.
  scales = [0.03, 10.0, 0.05, 8.0, 0.04, 12.0]
  grads = []
  for s in scales:
    g = {k: (s * rng.normal(size=v.shape)).astype(np.float32) for k, v in flat.items()}
    g["text/ln/bias"] = g["text/ln/scale"].copy()
    g["image/block_0/kernel"] = np.full(leaves["image/block_0/kernel"], 100.0, np.float32)
    grads.append(g)
  cfg = _cfg(((r"image/.*", 0.0), (r"text/ln/scale", 0.12345649), (r"fusion/bias", 0.5)))
  cfg.update(lr=0.05, weight_decay=0.3, b1=0.8, b2=0.95, warmup_fraction=0.5, total_steps=8,
             grad_clip=grad_clip)
  tx = optim.make(cfg, nest(flat))
  params = nest(flat)
  state = tx.init(params)
  update = jax.jit(tx.update)
  for t, g in enumerate(grads):
    updates, state = update(nest(g), state, params)
    params = optax.apply_updates(params, updates)
    if t == 1:  # The first step with a non-zero rate; the twins are still equal.
      first = unnest(updates)
  got = unnest(params)

  base = lambda t: 0.05 * (t / 4 if t < 4 else 0.5 * (1 + np.cos(np.pi * (t - 4) / 4)))
  expected = _numpy_adamw(flat, grads, mults, base, 0.8, 0.95, 0.3, grad_clip)
  for k in leaves:
    np.testing.assert_allclose(got[k], expected[k], rtol=2e-5, atol=2e-6, err_msg=k)
  # The frozen leaf did not move (no update, no decay) despite its gradient ...
  np.testing.assert_array_equal(got["image/block_0/kernel"], flat["image/block_0/kernel"])
  # ... and a leaf with multiplier m moves exactly m times what its x1 twin moves (one step:
  # after it the twins differ, and so does their decay), to float32's rounding.
  assert np.all(np.abs(first["text/ln/bias"]) > 1e-3)
  np.testing.assert_allclose(first["text/ln/scale"], 0.12345649 * first["text/ln/bias"],
                             rtol=1e-6)
  # The comparison is sensitive: every trained leaf moved by far more than the tolerance.
  for k in leaves:
    if mults[k]:
      assert np.min(np.abs(got[k] - flat[k])) > 1e-4, k


def test_negative_rates_and_clipping_norms_are_refused():
  """A negative learning rate, multiplier or clipping norm (which flips the gradient) trained
  towards a higher loss without a complaint; 0 stays allowed (no update; a frozen part)."""
  cfg = _cfg(((r"image/.*", 0.0),))
  cfg.lr = -1e-3
  with pytest.raises(ValueError, match=r"optim.lr=-0.001: learning rates"):
    optim.make(cfg, PARAMS)
  with pytest.raises(ValueError, match=r"optim.lr_mults: 'text/\.\*' x -0.5"):
    optim.make(_cfg(((r"text/.*", -0.5),)), PARAMS)
  cfg = _cfg(())
  cfg.grad_clip = -1.0
  with pytest.raises(ValueError, match=r"optim.grad_clip=-1.0"):
    optim.make(cfg, PARAMS)
  cfg.update(lr=0.0, grad_clip=1.0)
  optim.make(cfg, PARAMS)


@pytest.mark.parametrize("fraction", [1.0, 1.5, -0.1])
def test_a_warm_up_share_outside_zero_to_one_is_refused(fraction):
  # 1.5 capped the peak rate at two thirds of optim.lr, silently; -0.1 warmed up in one step.
  cfg = _cfg(())
  cfg.warmup_fraction = fraction
  with pytest.raises(ValueError, match=rf"optim.warmup_fraction={fraction}: the share of the "
                     "run spent warming up, at least 0 and below 1"):
    optim.make(cfg, PARAMS)
  cfg.warmup_fraction = 0.0
  optim.make(cfg, PARAMS)
