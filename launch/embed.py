r"""Embeds images and questions with the towers of a config and prints their similarities.

  python launch/embed.py --config=configs/demo.py
  python launch/embed.py --config=configs/base.py:image=clip_vit_b16,text=clip_vit_b16 \
      --config.model.image.checkpoint=/ckpt/clip-vit-base-patch16 \
      --config.model.text.checkpoint=/ckpt/clip-vit-base-patch16 \
      --image=scan.jpg --question="is there a pneumothorax?"

With no --image/--question it embeds the VQA-RAD samples bundled with the package. Images are
read as evaluation reads them (as a build stores them, shrunk to data.max_side, then the
whole image resized to the tower's square), questions as
training reads them (lower case, punctuation dropped: `medvqa_jax.data.text`).
Prints one JSON line: tower shapes, and the cosine similarity of every image with every
question when both towers project to the same width.
"""

import json

import common  # Puts the repository root on sys.path.
from absl import flags

_CONFIG = common.config_file_flag("configs/demo.py", "Config file.")
_IMAGES = flags.DEFINE_multi_string("image", [], "Image file(s) to embed.")
_QUESTIONS = flags.DEFINE_multi_string("question", [], "Question(s) to embed.")


def main(argv):
  del argv
  import jax
  import numpy as np

  from medvqa_jax import ASSETS
  from medvqa_jax.data import augment, builders
  from medvqa_jax.data import text as text_lib
  from medvqa_jax.data import tokenizer as tokenizer_lib
  from medvqa_jax.models import amif, state_dict, towers

  config = _CONFIG.value
  images, questions = _IMAGES.value, _QUESTIONS.value
  if not images and not questions:
    samples = json.loads((ASSETS / "demo" / "samples.json").read_text())
    images = sorted({str(ASSETS / "demo" / "images" / s["image"]) for s in samples})
    questions = [s["question"] for s in samples]
  empty = [q for q in questions if not text_lib.question(q).strip()]
  if empty:
    raise ValueError(f"--question {empty[0]!r} is empty (once read as training reads it)")

  compute = amif.compute_of(config)  # How the stacks run (model.compute), as in training.
  with state_dict.shared_reads():  # A CLIP checkpoint holds both towers: read it once.
    img_tower, img_params = towers.from_config(config.model.image, seed=config.seed,
                                               compute=compute, where="model.image")
    txt_tower, txt_params = towers.from_config(config.model.text, seed=config.seed,
                                               compute=compute, where="model.text")
  tokenizer = tokenizer_lib.from_config(config.model.text)
  tokenizer_lib.check_fits(tokenizer, {"text tower": txt_tower})

  summary = {"device": jax.devices()[0].device_kind}
  img_out = txt_out = None
  if images:
    # As a build stores them (shrunk to data.max_side) and training's test path reads them.
    pixels = np.stack([augment.resize(np.asarray(builders.read_as_built(
        p, config.data.get("max_side"))), img_tower.image_size) for p in images])
    img_out = jax.jit(img_tower.apply)({"params": img_params}, pixels)
    summary["image_tokens"] = list(img_out["tokens"].shape)
  if questions:
    batch = tokenizer([text_lib.question(q) for q in questions])
    txt_out = jax.jit(txt_tower.apply)({"params": txt_params}, batch["input_ids"],
                                       batch["attention_mask"])
    summary["question_tokens"] = list(txt_out["tokens"].shape)
  if img_out is not None and txt_out is not None:
    key = lambda out: "embedding" if "embedding" in out else "pooled"
    v, t = img_out[key(img_out)], txt_out[key(txt_out)]
    if v.shape[-1] == t.shape[-1]:
      v = v / np.linalg.norm(v, axis=-1, keepdims=True)
      t = t / np.linalg.norm(t, axis=-1, keepdims=True)
      sim = np.asarray(v @ t.T)
      summary["images"] = images
      summary["questions"] = questions
      summary["cosine_image_x_question"] = [[round(float(x), 4) for x in row] for row in sim]
    else:
      summary["note"] = (f"image ({v.shape[-1]}) and text ({t.shape[-1]}) features differ in "
                         "width: no similarities")
  print(json.dumps(summary))


if __name__ == "__main__":
  common.run(main)
