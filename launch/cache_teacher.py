r"""Precomputes the soft-label teacher's embeddings of a caption corpus into a cache file.

  python launch/cache_teacher.py --config=configs/pretrain_stage0.py \
      --config.data.dir=/data/tfds \
      --config.teacher.image.checkpoint=/ckpt/BiomedCLIP \
      --config.teacher.text.checkpoint=/ckpt/BiomedCLIP \
      --out=/data/teacher_biomedclip.npz

It embeds the training split of the corpus the config trains on (data.name, built in
data.dir by launch/prepare_data.py, or built there first from data.source_dir), every
example of it (the held-out validation slice included): the images as the dataset stores
them, un-augmented, resized to the teacher's resolution, and the captions as stored (cleaned
as the student reads them, medvqa_jax/data/text.py). The cache records which teacher and
which data made it (ids, captions, a digest of each stored image); training refuses a cache
that does not match. The file is written atomically: an interrupted run leaves none. Prints
one JSON line: the count, embedding width, teacher fingerprint and output path.
"""

import json
from pathlib import Path

import common  # Puts the repository root on sys.path.
from absl import flags

_CONFIG = common.config_file_flag("configs/pretrain_stage0.py", "Config file.")
_OUT = flags.DEFINE_string("out", None, "Cache file to write (.npz).", required=True)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Examples per forward pass.", lower_bound=1)


def main(argv):
  del argv
  from medvqa_jax import files as files_lib
  from medvqa_jax.data import splits as splits_lib
  from medvqa_jax.losses import teacher as teacher_lib
  config = _CONFIG.value
  dc = config.data
  out = Path(_OUT.value)  # Refused before the embeddings are computed, not after.
  if out.is_dir():
    raise ValueError(f"--out={out}: is a folder; name the cache file to write (.npz)")
  blocked = files_lib.unwritable(out.absolute().parent)  # Made by the save where missing.
  if blocked:
    raise ValueError(f"--out={out}: cannot be written ({blocked[0]} is {blocked[1]})")
  splits_lib.check_kind(dc, "caption", reader="launch/cache_teacher.py")
  splits_lib.ensure_built(dc)
  records = teacher_lib.DatasetRecords(dc.dir, dc.name, dc.train_split)
  teacher = teacher_lib.from_config(config)
  cache = teacher_lib.compute_cache(teacher, records, batch_size=_BATCH.value)
  cache.save(_OUT.value)
  print(json.dumps({"examples": len(cache.ids), "width": int(cache.image.shape[1]),
                    "multi_view": cache.image2 is not None, "teacher": cache.meta["teacher"],
                    "logit_scale": cache.logit_scale, "out": _OUT.value}))


if __name__ == "__main__":
  common.run(main)
