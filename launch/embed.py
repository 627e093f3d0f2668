r"""Embeds images and questions with the towers of a config, or of a trained run, and prints
their similarities.

  python launch/embed.py --config=configs/demo.py
  python launch/embed.py --config=configs/base.py:image=clip_vit_b16,text=clip_vit_b16 \
      --config.model.image.checkpoint=/ckpt/clip-vit-base-patch16 \
      --config.model.text.checkpoint=/ckpt/clip-vit-base-patch16 \
      --image=scan.jpg --question="is there a pneumothorax?"
  python launch/embed.py --checkpoint_dir=runs/stage1 [--step=N] --image=scan.jpg \
      --question="is there a pneumothorax?"

With no --image/--question it embeds the VQA-RAD samples bundled with the package. Images are
read as evaluation reads them (as a build stores them, shrunk to data.max_side, then the
whole image resized to the tower's square), questions as
training reads them (lower case, punctuation dropped: `medvqa_jax.data.text`).
Prints one JSON line: tower shapes, and the cosine similarity of every image with every
question when both towers project to the same width.

From a config the towers are its checkpoints' (or random ones where it names none), and the
similarities are those of the checkpoints' own projections (CLIP), else of the pooled
features. From a run (--checkpoint_dir: its folder, its checkpoints folder or one step's;
default the best step on validation) they are the run's global embeddings, the ones a
pre-training run's contrastive losses align: the trained towers' pooled features through the
run's projections, read with the run's tokenizer, image size and data.max_side (no --config
then). A fine-tuning run has no contrastive loss and leaves its projections untrained (a
warning says so): its similarities say little.
"""

import json
import sys

import common  # Puts the repository root on sys.path.
from absl import flags

_CONFIG = common.config_file_flag("configs/demo.py", "Config file.")
_IMAGES = flags.DEFINE_multi_string("image", [], "Image file(s) to embed.")
_QUESTIONS = flags.DEFINE_multi_string("question", [], "Question(s) to embed.")
_CKPT = flags.DEFINE_string("checkpoint_dir", None, "A trained run (its folder, checkpoints "
                            "folder or a step's folder): embed with its towers and projections "
                            "instead of a config's.")
_STEP = flags.DEFINE_integer("step", None, "With --checkpoint_dir: the checkpoint step "
                             "(default: best on validation).")


def main(argv):
  del argv
  import jax
  import numpy as np

  from medvqa_jax import ASSETS
  from medvqa_jax.data import augment, builders
  from medvqa_jax.data import text as text_lib

  if _CKPT.value is None and _STEP.value is not None:
    raise ValueError("--step names a step of a run: give the run with --checkpoint_dir")
  if _CKPT.value is not None and (flags.FLAGS["config"].present or common.config_overrides(
      _CONFIG.value)):
    raise ValueError("--checkpoint_dir embeds with the run's own config: give no --config or "
                     "--config.FIELD=VALUE with it")
  images, questions = _IMAGES.value, _QUESTIONS.value
  if not images and not questions:
    samples = json.loads((ASSETS / "demo" / "samples.json").read_text())
    images = sorted({str(ASSETS / "demo" / "images" / s["image"]) for s in samples})
    questions = [s["question"] for s in samples]
  empty = [q for q in questions if not text_lib.question(q).strip()]
  if empty:
    raise ValueError(f"--question {empty[0]!r} is empty (once read as training reads it)")

  common.check_images(images)  # Before the towers are loaded, not after.
  embed_images, embed_text, tokenizer, image_size, max_side, summary = (
      _run_towers() if _CKPT.value is not None else _config_towers())
  summary = {"device": jax.devices()[0].device_kind, **summary}
  v = t = None
  if images:
    # As a build stores them (shrunk to data.max_side) and training's test path reads them.
    pixels = np.stack([augment.resize(np.asarray(builders.read_as_built(p, max_side)),
                                      image_size) for p in images])
    tokens, v = embed_images(pixels)
    summary["image_tokens"] = list(tokens.shape)
  if questions:
    batch = tokenizer([text_lib.question(q) for q in questions])
    tokens, t = embed_text(batch["input_ids"], batch["attention_mask"])
    summary["question_tokens"] = list(tokens.shape)
  if v is not None and t is not None:
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


def _config_towers():
  """(embed images, embed text, tokenizer, image size, data.max_side, summary fields) of the
  config's towers. An embedding function gives (the tower's tokens, the features compared):
  the checkpoint's projection where it has one, else the pooled feature."""
  import jax
  import numpy as np

  from medvqa_jax.data import tokenizer as tokenizer_lib
  from medvqa_jax.models import amif, state_dict, towers
  from medvqa_jax.train import determinism, sharding

  config = _CONFIG.value
  compute = amif.compute_of(config)  # How the stacks run (model.compute), as in training.
  with state_dict.shared_reads():  # A CLIP checkpoint holds both towers: read it once.
    img_tower, img_params = towers.from_config(config.model.image, seed=config.seed,
                                               compute=compute, where="model.image")
    txt_tower, txt_params = towers.from_config(config.model.text, seed=config.seed,
                                               compute=compute, where="model.text")
  tokenizer = tokenizer_lib.from_config(config.model.text)
  tokenizer_lib.check_fits(tokenizer, {"text tower": txt_tower})
  compared = lambda out: np.asarray(out["embedding"] if "embedding" in out else out["pooled"])
  # train.deterministic's kernels on a GPU, as the run's programs would be compiled.
  options = determinism.compiler_options(config, sharding.make_mesh())
  img_apply = jax.jit(img_tower.apply, compiler_options=options)
  txt_apply = jax.jit(txt_tower.apply, compiler_options=options)

  def embed_images(pixels):
    out = img_apply({"params": img_params}, pixels)
    return out["tokens"], compared(out)

  def embed_text(ids, mask):
    out = txt_apply({"params": txt_params}, ids, mask)
    return out["tokens"], compared(out)

  return (embed_images, embed_text, tokenizer, img_tower.image_size,
          config.data.get("max_side"), {})


def _run_towers():
  """`_config_towers`'s fields for a trained run: its towers' tokens, and its global
  embeddings (`AMiF.encode_image` / `encode_text`: the projected pooled features, normalised)."""
  import jax
  import numpy as np

  from medvqa_jax.evaluate import run as run_lib
  from medvqa_jax.models.amif import AMiF
  from medvqa_jax.train import determinism

  r = run_lib.restore(_CKPT.value, step=_STEP.value)
  if r.config.model.head != "none":
    print(f"warning: {r.workdir} is a fine-tuning run ({r.config.model.head} head): no loss of "
          "it aligns these embeddings (it has no contrastive loss, and leaves its projections "
          "untrained), so their similarities say little", file=sys.stderr)
  variables = {"params": r.params}
  # Compiled as the run's programs were (train.deterministic's kernels on a GPU).
  options = determinism.compiler_options(r.config, r.mesh)
  img_apply = jax.jit(lambda v, x: r.model.apply(v, x, method=AMiF.encode_image),
                      compiler_options=options)
  txt_apply = jax.jit(lambda v, ids, mask: r.model.apply(v, ids, mask, method=AMiF.encode_text),
                      compiler_options=options)

  def embed_images(pixels):
    out = img_apply(variables, pixels)
    return out["tower"]["tokens"], np.asarray(out["embed"], np.float32)

  def embed_text(ids, mask):
    out = txt_apply(variables, ids, mask)
    return out["tower"]["tokens"], np.asarray(out["embed"], np.float32)

  return (embed_images, embed_text, r.tokenizer, r.model.image.image_size,
          r.config.data.get("max_side"), {"checkpoint_dir": str(r.workdir), "step": r.step})


if __name__ == "__main__":
  common.run(main)
