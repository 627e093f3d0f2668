r"""Builds a dataset from its download folder into a TFDS (array_record) dataset.

  python launch/prepare_data.py --dataset=vqa_rad --source_dir=/data/VQA_RAD --data_dir=/data/tfds
  python launch/prepare_data.py --dataset=slake --source_dir=/data/Slake1.0 \
      --data_dir=/data/tfds --max_side=384

Datasets: vqa_rad (MEVF split or the original public JSON), slake, pathvqa (pkl release,
Hugging Face parquet, or its JSON export), vqa_med_2019, and the pre-training corpora roco,
medicat, mimic_cxr (multi-view) and captions_jsonl. Bad records are reported with their file
and record and skipped; past --max_bad_fraction of any split's records the build fails and
leaves nothing behind. Records skipped from a split are counted in the metrics of its evaluation.
Building an existing dataset again is a no-op with the same options (max_side, splits,
language, test_frames) from the same files, and refused with others or from a download
folder whose files changed since (names and sizes): build into another data_dir, or delete
the old build.
Prints one JSON line summarising the dataset.
"""

import json

import common  # Puts the repository root on sys.path.
from absl import flags

_DATASET = flags.DEFINE_string("dataset", None, "Dataset name.", required=True)
_SOURCE = flags.DEFINE_string("source_dir", None, "The dataset as downloaded.", required=True)
_DATA_DIR = flags.DEFINE_string("data_dir", None, "Where built datasets live.", required=True)
_MAX_SIDE = flags.DEFINE_integer("max_side", 512, "Shrink images to this shorter side at build "
                                 "time (0: keep their size); 512 as the configs' data.max_side, "
                                 "with which training builds a dataset it finds unbuilt.",
                                 lower_bound=0)
_MAX_BAD = flags.DEFINE_float("max_bad_fraction", 0.01, "Fail if a larger share of any split's "
                               "records is bad (each split on its own).",
                               lower_bound=0.0, upper_bound=1.0)
_SPLITS = flags.DEFINE_list("splits", [], "Build only these splits (default: all found).")
_LANGUAGE = flags.DEFINE_string("language", "en", "SLAKE: question language (q_lang).")
_TEST_FRAMES = flags.DEFINE_bool(
    "test_frames", True, "VQA-RAD: train on the template rewrites ('frames') of test questions, "
    "as the MEVF split does (284 training questions with a test question's image and answer); "
    "--notest_frames leaves them out.")


def main(argv):
  del argv
  from medvqa_jax.data import builders
  options = {}
  if _DATASET.value == "slake":
    options["reader_options"] = {"language": _LANGUAGE.value}
  elif _DATASET.value == "vqa_rad":
    options["reader_options"] = {"test_frames": _TEST_FRAMES.value}
  builders.build(_DATASET.value, _SOURCE.value, _DATA_DIR.value,
                 max_side=_MAX_SIDE.value or None, max_bad_fraction=_MAX_BAD.value,
                 splits=_SPLITS.value or None, **options)
  print(json.dumps(builders.summary(_DATA_DIR.value, _DATASET.value)))


if __name__ == "__main__":
  common.run(main)
