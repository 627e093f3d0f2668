"""Starting a run from another run's parameters (`train.init_from`, `train.init_params`):
fine-tuning from a pre-training stage, stage 1 from stage 0."""

from __future__ import annotations

import logging
import re

import jax

from medvqa_jax.models.state_dict import flatten, unflatten
from medvqa_jax.train import checkpoint as ckpt_lib
from medvqa_jax.train import optim

log = logging.getLogger(__name__)


def from_run(config, state, shardings, tokenizer):
  """(state, taken, summary): `state` with the params matching train.init_params replaced by
  those of train.init_from (a run's work folder or its checkpoints folder: its
  best-on-validation step, as evaluation takes, the latest without validation; or one step
  folder), the paths taken, and a line naming what was taken and what was not. The text
  tower's and decoder's are refused when that run's tokenizer copy has another vocabulary
  than `tokenizer` (they would read other token ids: same-size vocabularies pass the shape
  check)."""
  tc = config.train
  expected = "a run's work folder, its checkpoints/ folder or one step folder in it"
  try:
    folder, step = ckpt_lib.resolve(tc.init_from)
  except FileNotFoundError as e:
    raise FileNotFoundError(f"--config.train.init_from: {e} (expected {expected})") from None
  other = ckpt_lib.Checkpoints(folder, read_only=True)
  step = step if step is not None else other.best_step()
  if step is None:
    raise FileNotFoundError(f"--config.train.init_from: no complete checkpoint in {folder} "
                            f"(expected {expected})")
  own = flatten(state["params"])
  wanted = {p for p in own if re.fullmatch(tc.init_params, p)}
  theirs = flatten(other.saved_params(step))
  take = sorted(p for p in wanted if p in theirs)
  left = sorted(wanted - theirs.keys())  # Matched here, absent there: left initial.
  unused = sorted(p for p in theirs.keys() - own.keys() if re.fullmatch(tc.init_params, p))
  if not take:
    raise ValueError(f"init_from {folder} step {step} has no parameters matching "
                     f"{tc.init_params!r} that this model has")
  bad = [p for p in take if tuple(theirs[p].shape) != tuple(own[p].shape)]
  if bad:
    raise ValueError(f"init_from: shapes differ for {bad[:5]}")
  textual = [p for p in take if p.split("/")[0] in ("text", "decoder")]
  their_tokenizer = ckpt_lib.run_tokenizer(folder.parent, config.model.text) if textual else None
  if textual and their_tokenizer is None:
    log.warning("init_from %s: no %s folder beside it (the copy its run saved), so its text "
                "tower and decoder parameters (%d arrays) are taken unchecked: they read this "
                "run's token ids (model.text), right only if that run used the same tokenizer",
                folder, folder.parent / ckpt_lib.TOKENIZER, len(textual))
  if their_tokenizer and their_tokenizer.hf.get_vocab() != tokenizer.hf.get_vocab():
    raise ValueError(
        f"init_from {folder.parent}: its tokenizer ({folder.parent / ckpt_lib.TOKENIZER}) has "
        f"another vocabulary than this run's (model.text), so its text tower and decoder "
        f"parameters ({len(textual)} arrays, e.g. {textual[0]}) would read other token ids: use "
        f"the same tokenizer, or leave them out with train.init_params (e.g. 'image/.*')")
  flat_shard = flatten(shardings["params"])
  abstract = unflatten({p: jax.ShapeDtypeStruct(own[p].shape, own[p].dtype,
                                                sharding=flat_shard[p]) for p in take})
  restored = flatten(other.restore_params(step, abstract, partial=True))
  own.update(restored)
  other.close()
  summary = (f"initialised {len(take)} of {len(own)} parameter arrays ({tc.init_params!r}) "
             f"from {folder} step {step}" + (f"; left at their initial values, not in it: "
                                             f"{_path_groups(left)}" if left else "")
             + (f"; in it but not in this model: {_path_groups(unused)}" if unused else ""))
  taken_parts = {p.split("/")[0] for p in take}
  partial = sorted({p.split("/")[0] for p in left + unused} & taken_parts)
  if partial:  # Another depth or naming: a part half from the run, half initial.
    log.warning("init_from %s step %s initialises %s only in part (another depth or layout "
                "there than here?): %s", folder, step, ", ".join(partial),
                _path_groups([p for p in left + unused if p.split("/")[0] in partial]))
  return {**state, "params": unflatten(own)}, set(take), summary


def warn_frozen_random(config, params, taken=frozenset()) -> None:
  """Warns of a tower frozen by optim.lr_mults that holds random parameters: built from
  `init` and not (wholly) among the arrays `taken` from train.init_from."""
  frozen = flatten(optim.frozen_mask(config.optim, params))
  for part in ("image", "text"):
    arrays = [p for p in frozen if p.split("/")[0] == part]
    random = [p for p in arrays if p not in taken]
    if config.model[part].source == "init" and random and all(frozen[p] for p in arrays):
      log.warning("the %s tower is frozen (optim.lr_mults) but randomly initialised (%d of "
                  "its %d parameter arrays): start from a run that trained it with "
                  "--config.train.init_from=RUN (train.init_params covering it)", part,
                  len(random), len(arrays))


def _path_groups(paths, limit: int = 8) -> str:
  """Parameter paths summarised by their first two levels, with the number of arrays in
  each: 'fusion/image_layer_1 (26), gca/gate (2)'."""
  groups = {}
  for path in paths:
    group = "/".join(path.split("/")[:2])
    groups[group] = groups.get(group, 0) + 1
  names = [f"{g} ({n})" for g, n in sorted(groups.items())]
  more = f" and {len(names) - limit} more groups" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more
