r"""Input-pipeline throughput: decoded + augmented images per second, per worker and in total.

  python launch/benchmark_input.py --data_dir=/tmp/tfds \
      --source_dir=../shared/data/vqa_rad --workers=0,2,4

Builds the dataset into --data_dir first if it is not there (from --source_dir, its images
shrunk to --max_side as training builds them; a build that is there is read as it is), then
times --batches batches (at least 4 per worker) of --batch_size at --image_size (288 by
default, the paper's) with the --augmentation, for each worker count, after 4 untimed batches
per worker (at least 1: the batches made while the workers started). Prints one JSON line. A VQA
dataset gives the fine-tuning batches (fine-tuning augmentation by default); a caption corpus
(roco, medicat, mimic_cxr, captions_jsonl) gives the pre-training batches, two views per
example, both counted as images (pre-training augmentation by default). --augmentation=test
times decoding and resizing alone.

With --workers=0 the batches are made in this process, by `pipeline.iterate`'s prefetching
threads (two: up to two cores, as PIL releases the GIL), so images_per_s_per_worker is not one
core's figure there; images_per_cpu_s is (images per second of CPU time, on a loaded machine
too), and what a worker process would do on a core of its own.

  python launch/benchmark_input.py --data_dir=/tmp/tfds --dataset=captions_jsonl \
      --source_dir=/data/corpus
"""

import json
import os
import time

import common  # Puts the repository root on sys.path.
from absl import flags

_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where built datasets live.", required=True)
_DATASET = flags.DEFINE_string("dataset", "vqa_rad", "Dataset name.")
_SOURCE = flags.DEFINE_string("source_dir", None, "Download folder, to build if needed.")
_MAX_SIDE = flags.DEFINE_integer("max_side", 512, "A build made here shrinks images to this "
                                 "shorter side (0: keeps their size); 512 as the configs' "
                                 "data.max_side and prepare_data.py.", lower_bound=0)
_SPLIT = flags.DEFINE_string("split", "train", "Split to read.")
_SIZE = flags.DEFINE_integer("image_size", 288, "Output image side.", lower_bound=1)
_BATCH = flags.DEFINE_integer("batch_size", 64, "Examples per batch (a caption corpus's have "
                              "two views each: twice as many images).", lower_bound=1)
_BATCHES = flags.DEFINE_integer("batches", 20, "Timed batches per setting (at least 4 per "
                                "worker).", lower_bound=1)
_WORKERS = flags.DEFINE_list("workers", ["0", "2"], "Worker process counts to time (0: "
                             "in-process threads).")
_AUG = flags.DEFINE_enum("augmentation", None, ["finetune", "pretrain", "test"],
                         "Augmentations (default: pretrain for a caption corpus, finetune "
                         "otherwise).")


def main(argv):
  del argv
  from medvqa_jax import ASSETS
  from medvqa_jax.data import builders, pipeline
  from medvqa_jax.data.tokenizer import Tokenizer
  try:
    counts = [int(w) for w in _WORKERS.value]
  except ValueError:
    counts = []
  if not counts or min(counts) < 0:
    raise ValueError(f"--workers={','.join(_WORKERS.value)}: expected worker counts >= 0, "
                     "e.g. --workers=0,2,8")
  if not builders.is_built(_DATA_DIR.value, _DATASET.value):
    if not _SOURCE.value:
      raise FileNotFoundError(f"{_DATASET.value} is not built in {_DATA_DIR.value}: pass "
                              "--source_dir to build it")
    builders.build(_DATASET.value, _SOURCE.value, _DATA_DIR.value,
                   max_side=_MAX_SIDE.value or None)
  # As training reads it: images as stored, decoded by the pipeline as it augments.
  source = builders.load(_DATA_DIR.value, _DATASET.value, _SPLIT.value, decode_images=False)
  tokenizer = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=30)
  kind = builders.kind(_DATASET.value)
  views = 2 if kind == "caption" else 1  # Caption batches carry two views of each example.
  augmentation = _AUG.value or ("pretrain" if kind == "caption" else "finetune")
  ds = pipeline.batches(source, kind=kind, tokenizer=tokenizer, image_size=_SIZE.value,
                        global_batch=_BATCH.value, seed=0, augmentation=augmentation)
  results = []
  for workers in counts:
    # Start-up (worker processes, first decodes) is not timed, nor are the batches the
    # workers made meanwhile (`prefetch` each, read at once): 4 per worker, as benchmark.py's
    # --pipeline run. Nor could the timed batches be: at least 4 per worker are timed.
    warmup, timed = max(1, 4 * workers), max(_BATCHES.value, 4 * workers)
    # Each setting's workers stop before the next one starts.
    with pipeline.iterate(ds, num_workers=workers) as it:
      for _ in range(warmup):
        next(it)
      start, cpu = time.perf_counter(), time.process_time()
      for _ in range(timed):
        next(it)
      seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    images = timed * _BATCH.value * views
    rate = images / seconds
    result = {"workers": workers, "images_per_s": round(rate, 1),
              "images_per_s_per_worker": round(rate / max(workers, 1), 1),
              "warmup_batches": warmup, "timed_batches": timed}
    if workers == 0:  # In-process: its threads' CPU time is this process's.
      result["images_per_cpu_s"] = round(images / cpu, 1)
    results.append(result)
  print(json.dumps({"dataset": _DATASET.value, "split": _SPLIT.value, "image_size": _SIZE.value,
                    "augmentation": augmentation, "batch_size": _BATCH.value, "views": views,
                    "host_cpus": os.cpu_count(), "results": results}))


if __name__ == "__main__":
  common.run(main)
