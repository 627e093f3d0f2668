r"""Answers a question about an image with a trained checkpoint; prints the top answers with
their scores and writes a PNG of the question-to-patch attention and the GCA gates.

  python launch/predict.py --checkpoint_dir=runs/demo --image=scan.jpg \
      --question="is there a pneumothorax?" [--top=5] [--out=answer.png]

Scores are probabilities: the classifier's softmax, or the generative head's sequence
probability of each candidate answer (of the top-k re-scored ones), listed in the order the
run's model.rank_score ranks them (by that probability, unless "first_token_twice"). The PNG
shows the image, the same image with the last fusion layer's attention from the question's
tokens to the image patches overlaid, and per question token the mean GCA gate value (1: the
token's fused feature is replaced by what it read from the answer vocabulary; 0: kept). A run
without fusion layers has no such attention: no PNG is written for it.

The image is read as the run's dataset stores its images (shrunk to data.max_side) and
evaluation reads them, so the answers and scores are eval.py's for the same image and
question; in bfloat16 a score can differ from eval.py's in the third digit (one question here,
batches of train.eval_batch_size there: XLA's kernels round differently).
"""

import io
import json
import os
import sys
from pathlib import Path

import common  # Puts the repository root on sys.path.
from absl import flags

_CKPT = flags.DEFINE_string("checkpoint_dir", None, "Run folder or checkpoint folder.",
                            required=True)
_IMAGE = flags.DEFINE_string("image", None, "Image file.", required=True)
_QUESTION = flags.DEFINE_string("question", None, "The question.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: best on validation).")
_TOP = flags.DEFINE_integer("top", 5, "Answers to print (the generative head: at most "
                            "the candidates it re-scores: model.rank_k, or more where more "
                            "answers begin with the same word piece).", lower_bound=1)
_OUT = flags.DEFINE_string("out", "prediction.png", "PNG to write ('' for none).")


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np

  from medvqa_jax import files as files_lib
  from medvqa_jax.data import builders
  from medvqa_jax.data import pipeline
  from medvqa_jax.data import text as text_lib
  from medvqa_jax.evaluate import run as run_lib
  from medvqa_jax.evaluate import visualize
  from medvqa_jax.evaluate import vqa
  from medvqa_jax.models.amif import AMiF
  from medvqa_jax.train import determinism

  if not text_lib.question(_QUESTION.value).strip():
    raise ValueError(f"--question {_QUESTION.value!r} is empty (once read as training reads it)")
  common.check_images([_IMAGE.value])  # Before the model is restored, not after.
  if _OUT.value:
    from PIL import Image
    picture_path = Path(_OUT.value)
    picture_format = Image.registered_extensions().get(picture_path.suffix.lower())
    try:  # PIL reads more formats than it writes (and has stubs that only say so).
      Image.new("RGB", (8, 8)).save(io.BytesIO(), format=picture_format)
    except (KeyError, OSError, ValueError):
      raise ValueError(f"--out={_OUT.value}: name an image file PIL writes (.png), or pass "
                       "--out= for none") from None
    if not picture_path.parent.is_dir():
      raise FileNotFoundError(f"--out={_OUT.value}: no folder {picture_path.parent}")
    if not os.access(picture_path.parent, os.W_OK):  # Refused now, not after answering.
      raise PermissionError(f"--out={_OUT.value}: {picture_path.parent.absolute()} cannot "
                            "be written: name a picture elsewhere, or pass --out='' for none")
  r = run_lib.restore(_CKPT.value, step=_STEP.value, answering=True)
  predictor = r.predictor()
  picture = builders.read_as_built(_IMAGE.value, r.config.data.get("max_side"))
  example = pipeline._Example("vqa", r.tokenizer, r.model.image.image_size, "test")(
      {"id": "input", "image": np.asarray(picture), "question": _QUESTION.value,
       "answers": [""]})
  pieces = len(r.tokenizer.hf(text_lib.question(_QUESTION.value))["input_ids"])
  if pieces > r.tokenizer.max_len:
    print(f"warning: the question takes {pieces} word pieces (its start and end pieces "
          f"included); the model reads {r.tokenizer.max_len}: the question cut to its first "
          f"{r.tokenizer.max_len - 2}", file=sys.stderr)
  inputs = [jnp.asarray(example[k])[None] for k in ("images", "input_ids", "attention_mask")]
  variables = {"params": r.params}
  # Compiled as the run's evaluation compiles (train.deterministic's kernels on a GPU), so the
  # scores are eval.py's.
  options = determinism.compiler_options(r.config, r.mesh)
  out = jax.jit(lambda v, *x: r.model.apply(v, *x, predictor.prior_ids, predictor.prior_mask,
                                            return_weights=True, method=AMiF.vqa),
                compiler_options=options)(variables, *inputs)
  if r.model.head == "classifier":
    log_prob = np.asarray(jax.nn.log_softmax(out["logits"][0]))
    order = np.argsort(-log_prob, kind="stable")[:_TOP.value]  # Ties: as argmax picks.
    top = [(r.answers[i], vqa.probability(log_prob[i])) for i in order]
  else:
    ranked = jax.jit(lambda v, *x: r.model.apply(
        v, *x, predictor.prior_ids, predictor.prior_mask, predictor.cand_ids, predictor.cand_mask,
        k=predictor.k, pack=predictor.pack, score=predictor.score,
        method=AMiF.rank), compiler_options=options)(variables, *inputs)
    # In the order model.rank_score ranks them, each scored by its sequence probability.
    (top,) = vqa.ranked_answers(ranked, r.answers, _TOP.value)
  print(json.dumps({"question": _QUESTION.value, "image": _IMAGE.value, "step": r.step,
                    "protocol": r.protocol,
                    "answers": [{"answer": a, "score": float(f"{s:.6g}")} for a, s in top]}))
  if _OUT.value and not out["fusion_text_weights"]:
    print(f"warning: the run has no fusion layers, so no question-to-patch attention to "
          f"draw: {_OUT.value} not written", file=sys.stderr)
  elif _OUT.value:
    mask = np.asarray(example["attention_mask"], bool)
    ids = np.asarray(example["input_ids"])[mask]
    tokens = r.tokenizer.hf.convert_ids_to_tokens(ids.tolist())
    heat = visualize.patch_heatmap(np.asarray(out["fusion_text_weights"][-1][0]), mask)
    gates = np.asarray(out["gate"][0, :len(mask)].mean(axis=-1))[mask]
    drawn = visualize.render(picture, heat, tokens, gates, _QUESTION.value, top)
    # Written to a temporary file and renamed: an interrupted write leaves the old file.
    tmp = files_lib.temporary(picture_path)
    try:
      drawn.save(tmp, format=picture_format)
      os.replace(tmp, picture_path)
    finally:
      tmp.unlink(missing_ok=True)
    print(f"wrote {_OUT.value}", file=sys.stderr)


if __name__ == "__main__":
  common.run(main)
