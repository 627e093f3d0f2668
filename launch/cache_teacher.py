r"""Precomputes the soft-label teacher's embeddings of a corpus into a cache file.

  python launch/cache_teacher.py --config=configs/pretrain_stage0.py \
      --config.teacher.image.checkpoint=/ckpt/BiomedCLIP \
      --config.teacher.text.checkpoint=/ckpt/BiomedCLIP \
      --records=/data/corpus.jsonl --out=/data/teacher_biomedclip.npz

--records is a JSONL file, one {"id", "image", "caption"[, "image2"]} per line (image paths
relative to the file). The teacher sees each image un-augmented, resized to its own
resolution, and the caption cleaned as the student reads it (medvqa_jax/data/text.py). The
cache records which teacher and which data made it (ids, captions, and each image as the
dataset stores it: shrunk to the max_side the dataset in --config.data.dir was built with,
else to --config.data.max_side); training refuses a cache that does not match. The file is
written atomically: an interrupted run leaves none. Prints one JSON line: the count, embedding width, teacher fingerprint and output path.
"""

import json

import common  # Puts the repository root on sys.path.
from absl import flags

_CONFIG = common.config_file_flag("configs/pretrain_stage0.py", "Config file.")
_RECORDS = flags.DEFINE_string("records", None, "JSONL file of {id, image, caption}.",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "Cache file to write (.npz).", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Examples per forward pass.")


def main(argv):
  del argv
  from medvqa_jax.data import builders
  from medvqa_jax.losses import teacher as teacher_lib
  config = _CONFIG.value
  dc = config.data
  max_side = dc.get("max_side")
  if dc.get("dir") and dc.get("name") and builders.is_built(dc.dir, dc.name):
    built = builders.built_options(dc.dir, dc.name)
    if built is not None and built["max_side"] != max_side:
      print(f"{dc.name} in {dc.dir} stores its images at max_side={built['max_side']}: the "
            "cache sees them so", flush=True)
      max_side = built["max_side"]
  records = teacher_lib.read_jsonl(_RECORDS.value)
  teacher = teacher_lib.from_config(config)
  cache = teacher_lib.compute_cache(teacher, records, batch_size=_BATCH.value,
                                    max_side=max_side)
  cache.save(_OUT.value)
  print(json.dumps({"examples": len(cache.ids), "width": int(cache.image.shape[1]),
                    "multi_view": cache.image2 is not None, "teacher": cache.meta["teacher"],
                    "logit_scale": cache.logit_scale, "out": _OUT.value}))


if __name__ == "__main__":
  common.run(main)
