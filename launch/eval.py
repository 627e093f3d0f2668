r"""Evaluates a trained checkpoint on a split and writes metrics.json and predictions.jsonl.

  python launch/eval.py --checkpoint_dir=runs/demo                  # best-on-validation step, test split
  python launch/eval.py --checkpoint_dir=/runs/slake --split=validation --step=3000
  python launch/eval.py --checkpoint_dir=/runs/slake --closed_set   # candidates of every split

--checkpoint_dir is a run's work folder, its checkpoints/ folder or one step folder. The
run's own config is used (recorded with its checkpoints), with the --config.FIELD=VALUE given
here set on it, e.g. where the data are now:

  python launch/eval.py --checkpoint_dir=/runs/slake --config.data.dir=/new/place/tfds

(the overrides taken are printed, and filed with the metrics; one the evaluation does not
read, such as optim.* or train.fsdp (--fsdp shards the parameters), is left out with a
warning saying why; data whose training and validation examples are not the run's
are refused: another held-out slice would hold examples it trained on). The dataset is read
as built, never built here. The parameters are restored onto the devices this process has,
whatever the training run used; on several hosts,
run the same command in every process, as for training (launch/tpu_pod.sh, slurm.sbatch, or
--coordinator_address/--num_processes/--process_id), and each answers its share. Outputs go to
<workdir>/eval/<split>-step<N>/ (<split>-step<N>-closed-set/ under the closed-set protocol,
beside the open-set results; or --out), checked writable before anything is answered; earlier
results there are replaced, and named as they are. Each says which answer protocol produced
it, and metrics.json which run folder (run). Records of the split that its build skipped as
bad are counted there (skipped_at_build) and warned of; for a held-out validation slice, those
of the split it is drawn from (skipped_from).

A pre-training run is evaluated on its corpus's held-out slice, as its validation during
training was (the objective's terms, image<->text retrieval recall): metrics.json in
<workdir>/eval/validation-step<N>/. The teacher cache (or, online, the teacher's checkpoint)
of the run's config must still be where the config says (or where --config.teacher.cache
says); the cache is checked against the teacher the run recorded, whose checkpoint is not read.
"""

import json
import sys
from pathlib import Path

import common  # Puts the repository root on sys.path.
from absl import flags

# Only the fields given as --config.FIELD=VALUE are used, set on the run's own config; the
# file names the fields and their types.
_CONFIG = common.config_file_flag("configs/base.py", "Names the fields of the "
                                  "--config.FIELD=VALUE overrides, which are set on the run's "
                                  "own config; the file's other values are not used.")
_CKPT = flags.DEFINE_string("checkpoint_dir", None, "Run folder or checkpoint folder.",
                            required=True)
_SPLIT = flags.DEFINE_string("split", None, "train, validation (val) or test (default: test; "
                             "a pre-training run: its held-out validation slice).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: best on validation).")
_OUT = flags.DEFINE_string("out", None, "Output folder.")
_CLOSED = flags.DEFINE_boolean("closed_set", None, "Candidate answers from all splits (the "
                               "closed-set protocol; a generative run trained open-set keeps "
                               "its GCA prior); default: the protocol the run was trained "
                               "with. A run trained closed-set is never evaluated open-set "
                               "(its prior holds the test answers).")
_FSDP = flags.DEFINE_integer("fsdp", 1, "Ways of parameter sharding.", lower_bound=1)
_JOIN = common.cluster_flags()


def main(argv):
  del argv
  if _OUT.value and Path(_OUT.value).exists() and not Path(_OUT.value).is_dir():
    # Refused before the evaluation, not after it.
    raise ValueError(f"--out={_OUT.value}: is a file; name the folder to write the metrics in")
  _JOIN()
  import jax

  from medvqa_jax.evaluate import run as run_lib
  restored = run_lib.restore(_CKPT.value, overrides=common.config_overrides(_CONFIG.value),
                             step=_STEP.value, fsdp=_FSDP.value)
  if restored.changes and jax.process_index() == 0:
    print("the run's config, with:\n  " + "\n  ".join(restored.changes), file=sys.stderr)
  metrics = run_lib.evaluate_split(restored, _SPLIT.value, out_dir=_OUT.value,
                                   closed_set=_CLOSED.value)
  if jax.process_index() == 0:
    from medvqa_jax.evaluate import vqa
    note = vqa.skipped_note(metrics)
    if note:
      print(note, file=sys.stderr)
    print(json.dumps(metrics))


if __name__ == "__main__":
  common.run(main)
