"""Base config: the AMiF model (towers, fusion, GCA, answer head) and the soft-label teacher.

Towers are picked by preset name (files in configs/towers/), e.g.
  --config=configs/base.py:image=clip_vit_b16,text=bio_clinicalbert,teacher=biomedclip
and any field is overridable, e.g. --config.model.image.checkpoint=/ckpt/clip-vit-base-patch16.
Defaults are the paper's: CLIP ViT-B/16 image tower, Bio_ClinicalBERT text tower,
BiomedCLIP teacher.
"""

import importlib
from pathlib import Path

import ml_collections

from configs.towers.common import unset

DEFAULTS = dict(image="clip_vit_b16", text="bio_clinicalbert", teacher="biomedclip")


def preset(name: str) -> ml_collections.ConfigDict:
  try:
    module = importlib.import_module(f"configs.towers.{name}")
  except ModuleNotFoundError as e:
    if e.name != f"configs.towers.{name}":  # The preset's own import failed: say which.
      raise
    module = None
  if not hasattr(module, "get_config"):
    folder = Path(__file__).parent / "towers"
    names = sorted(p.stem for p in folder.glob("*.py")
                   if "def get_config" in p.read_text())
    raise ValueError(f"no tower preset {name!r} in configs/towers/ (presets: "
                     f"{', '.join(names)})")
  return module.get_config()


def parse_arg(arg: str | None) -> dict:
  choice = dict(DEFAULTS)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in DEFAULTS:
      raise ValueError(f"config argument {item!r}: expected one of "
                       f"{', '.join(k + '=PRESET' for k in DEFAULTS)}")
    choice[key] = value
  return choice


def get_config(arg=None):
  choice = parse_arg(arg)
  image, text, teacher = (preset(choice[k]) for k in ("image", "text", "teacher"))
  for part, cfg in (("image", image), ("text", text)):
    if part not in cfg:
      raise ValueError(f"tower preset {choice[part]!r} has no {part} tower")
  if "image" not in teacher or "text" not in teacher:
    raise ValueError(f"teacher preset {choice['teacher']!r} needs an image and a text tower")
  # The teacher is its checkpoint's model whole, at its own resolution: a preset's cuts are
  # the student's (clip_vit_b16 keeps 11 of CLIP's 12 blocks at 288 px), and a teacher so cut
  # gave other embeddings than CLIP's. A tower from scratch keeps the preset's shape.
  for part in ("image", "text"):
    if teacher[part].source != "init":
      for field in ("depth", "image_size"):
        if field in teacher[part].arch:  # Unset, and still settable from the command line.
          teacher[part].arch[field] = unset(int)
  # Unset: the teacher reads the captions at the student's model.text.max_len (at most what
  # its text tower reads), as the reference's teacher does; set, at that many tokens.
  teacher.text.max_len = unset(int)
  config = ml_collections.ConfigDict(dict(
      seed=0,
      model=dict(
          image=image.image, text=text.text,
          # Co-attention fusion: layers per stream, width of the projected tokens.
          fusion=dict(width=768, layers=6, heads=12, mlp_dim=3072),
          # Answer head: "generative" (BERT decoder ranking candidates), "classifier"
          # (MLP over the answer vocabulary; num_answers from the data) or "none".
          head="generative",
          num_answers=unset(int),
          # The decoder is the text checkpoint's BERT (its first `depth` layers if set),
          # causal, cross-attending to the GCA output from layer `cross_from` on; unset: the
          # second half of its layers (6-11 of 12, as in the paper; 3-5 of MiniLM's 6).
          decoder=dict(cross_from=unset(int), depth=unset(int)),
          prior_max_tokens=1024,  # Answer-vocabulary prior of the GCA, in word pieces.
          # Answer tokens, [CLS] and [SEP] included (the reference cuts at 30; the longest
          # answers of VQA-RAD, SLAKE, PathVQA and VQA-Med-2019 have 27-30 word pieces).
          answer_max_len=32,
          rank_k=32,             # Candidates re-scored by full likelihood (at least the
                                 # largest group beginning with one word piece).
          # The re-scoring (amif.RANK_SCORES): "likelihood", the answer's log-likelihood, or
          # "first_token_twice", the paper's code's 2 log p(first) + log p(rest | first), for
          # numbers comparable with its own. It changes answering only (validation, test,
          # predict.py), not training: eval.py can set it on a trained run.
          rank_score="likelihood",
          dtype="float32",       # Compute dtype of fusion, GCA and heads (the generative
                                 # head's decoder too, whatever text.dtype is).
          # BERT's hidden dropout, in training only: the text tower (a BERT), the fusion and
          # the decoder, as the reference trains them. Not on attention probabilities: the
          # fused attention kernels have no dropout, and a compute setting never changes what
          # is computed.
          dropout=0.1,
          # How every transformer stack computes (medvqa_jax/models/layers.Compute; outputs and
          # parameters do not depend on it): attention "reference", "xla", "cudnn" (fused,
          # GPU, bf16) or "auto" (cudnn on a GPU in bf16/fp16 where it takes the head dim and
          # pad_to, else reference: on a CPU or TPU, or in float32, auto is the reference);
          # fused kernels see token counts padded to pad_to; scan the layers; remat "none",
          # "full" or "dots".
          compute=dict(attention="auto", pad_to=16, scan=False, remat="none"),
      ),
      # The frozen soft-label teacher. mode: "cache" (embeddings precomputed by
      # launch/cache_teacher.py into `cache`), "online" (computed in the step) or "none"
      # (hard-label InfoNCE ablation). logit_scale: unset reads the checkpoint's (a randomly
      # initialised teacher, e.g. the tiny preset: CLIP's initial 1/0.07).
      teacher=dict(image=teacher.image, text=teacher.text, mode="cache",
                   cache=unset(str), logit_scale=unset(float)),
      # Pre-training objectives (medvqa_jax/losses).
      losses=dict(
          weights=dict(itgc=1.0, imvc=1.0, utgc=1.0, wpa=3.0, itm=1.0),
          lam=0.01,                # Flexibility weight of the soft labels.
          label_smoothing=0.1,     # Hard-label InfoNCE only (no teacher), as the reference.
          temperature_init=0.07,
          # Word-patch alignment: entropic OT (OTT-JAX Sinkhorn) or the reference's IPOT.
          ot=dict(solver="sinkhorn", epsilon=0.1, max_iterations=100, min_iterations=0,
                  threshold=1e-3, ipot_beta=0.5, ipot_iterations=50),
          itm=dict(negative_images=False),  # Also one hard-negative image per text.
      ),
      # AdamW, warm-up + cosine; lr_mults: (path regex, multiplier), 0 freezes. The run is
      # total_steps long or train.epochs over the training split (set one of them: the
      # fine-tuning configs count in epochs, pre-training in steps). The
      # pre-training lr (1e-4, both stages) is ours: the reference's stored stage-1 config
      # has 4e-6 but starts its fusion from a pre-trained checkpoint, ours from scratch; its
      # stage-0 lr is not in the code. The 40% warm-up is the reference's fine-tuning one,
      # which pre-training keeps (4,000 of its 10,000 steps). grad_clip: the gradient's
      # global norm is clipped to it (unset or 0: not clipped).
      optim=dict(lr=1e-4, weight_decay=0.02, b1=0.9, b2=0.98, warmup_fraction=0.4,
                 total_steps=unset(int), lr_mults=(), grad_clip=unset(float)),
      # The dataset, built by launch/prepare_data.py into `dir` (or built there on first use
      # from `source_dir`, the download folder). val_split "" holds out a seeded slice
      # (val_fraction, whole images) of train for model selection (VQA-RAD has no validation
      # split). Answers (vocabulary, GCA prior, ranking candidates) come from train +
      # validation; closed_set=True reproduces the paper's protocol (candidates from every
      # split, test included) and every output is labelled with the protocol used.
      # reader_options: the options of the dataset's reader that it takes (SLAKE's question
      # language; VQA-RAD's test_frames, False to leave out the template rewrites of test
      # questions), as prepare_data.py's --language and --test_frames: a build with others
      # is refused, not read. workers: processes making the training batches, each two at a
      # time in two threads (up to 2 x workers cores; 0: this one, likewise: enough for a
      # CPU, not for a GPU's paper-size step, which the run notes; the batches are the same
      # whatever the count).
      data=dict(name=unset(str), dir=unset(str), source_dir=unset(str), max_side=512,
                train_split="train", val_split="validation", val_fraction=0.1,
                test_split="test", closed_set=False, workers=0,
                reader_options=dict(language="en", test_frames=True)),
      # The loop (medvqa_jax/train/loop.py). workdir holds checkpoints, logs and eval outputs;
      # batch_size is global (all hosts); accum_steps micro-batches per step (fine-tuning
      # only). A checkpoint every save_every steps and at the end (the last `keep`, plus the
      # latest step (a stop's save), plus the best on validation, chosen among the steps
      # saved and validated: make save_every a multiple of eval_every); validation every
      # eval_every steps. epochs: the run's length in passes over the training split (0 or
      # unset: optim.total_steps). init_from: another
      # run (its workdir or checkpoints folder: its best-on-validation step; or one step
      # folder) whose params matching init_params (regex) start this run (not a resumed one).
      # fsdp: ways of parameter sharding (1: pure data parallel) of the arrays of at least
      # fsdp_min_size elements whose path matches an fsdp_rules regex. prefetch: batches
      # copied to the devices ahead of the step that reads them (sharding.prefetch). rng:
      # the random numbers' implementation (dropout, ITM negatives): "threefry" (JAX's
      # default; dropout hashes it in-line, layers.keep_mask), "rbg" or "unsafe_rbg" (XLA's
      # RngBitGenerator; draws that may differ between devices and XLA versions;
      # train/step.RNG_IMPLS). log_every: steps between logged metric records;
      # eval_batch_size: the global batch of evaluations (VQA answering; a pre-training
      # run validates in batch_size); tensorboard: also write the metrics as TensorBoard
      # scalars (<workdir>/tensorboard/).
      train=dict(workdir=unset(str), batch_size=32, accum_steps=1, epochs=unset(int),
                 prefetch=2, rng="threefry",
                 log_every=10, eval_every=500, save_every=500, keep=2, eval_batch_size=64,
                 fsdp=1, fsdp_rules=(".*",), fsdp_min_size=2 ** 14, init_from=unset(str),
                 init_params=".*", tensorboard=True,
                 # On a GPU: XLA's deterministic kernels, picked without autotuning, so that
                 # a run and its resumption repeat bit for bit (train/determinism.py).
                 deterministic=False,
                 inject_nan_at=unset(int)),  # Testing: an infinite gradient at this step.
  ))
  config.lock()
  return config
