r"""Trains (fine-tunes or pre-trains) the model of a config; resumes if its work folder holds
a checkpoint.

  python launch/train.py --config=configs/demo.py                       # the embedded default
  python launch/train.py --config=configs/pathvqa.py --config.data.dir=/data/tfds \
      --config.train.workdir=/runs/pathvqa
  python launch/train.py --config=configs/pretrain_stage1.py --config.data.name=roco ...

Multi-host (TPU pod slice, SLURM, Open MPI 4's mpirun): run the same command in every
process; the cluster is detected, or give --coordinator_address/--num_processes/--process_id
(README: Scaling out). Writes
<workdir>/checkpoints, metrics.jsonl, tensorboard/ and, after fine-tuning, the test metrics
and predictions of the best-on-validation checkpoint in <workdir>/eval/<test split>/.

SIGTERM (a scheduler's pre-emption notice) during training finishes the step in progress,
saves a checkpoint of it (on several hosts: of the step they agree on) and stops; Ctrl-C, a
second SIGTERM, or SIGTERM outside the training steps stops at once (on several hosts JAX's
runtime holds SIGTERM, and outside the training steps the scheduler's kill stops the run).
Either way a checkpoint being written is finished, the input workers are stopped, and it
exits with status 130 naming the checkpoint the same command will resume from. A second
training in a work folder while one runs there is refused (the folder is locked).
"""

import json
import sys

import common  # Puts the repository root on sys.path.

_CONFIG = common.config_file_flag("configs/demo.py", "Config file.")
_JOIN = common.cluster_flags()


def _stopped(config):
  from medvqa_jax.train import checkpoint as ckpt_lib
  from medvqa_jax.train import loop
  folder = loop.workdir_of(config) / "checkpoints"
  latest = ckpt_lib.Checkpoints(folder, read_only=True).latest_step() if folder.is_dir() else None
  where = (f"the latest checkpoint is step {latest} in {folder}" if latest is not None
           else "no checkpoint was saved yet")
  print(f"interrupted: {where}; run the same command again to resume", file=sys.stderr)
  sys.exit(130)


def main(argv):
  del argv
  from medvqa_jax.train import preemption
  preemption.install()  # Before joining: a multi-host runtime then takes SIGTERM over.
  _JOIN()
  import jax

  from medvqa_jax.train import loop
  config = _CONFIG.value
  try:
    metrics = loop.train(config)
  except loop.Diverged as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(3)
  except KeyboardInterrupt:
    _stopped(config)
  if jax.process_index() == 0 and metrics:
    from medvqa_jax.evaluate import vqa
    print(vqa.summary(metrics))
    print(json.dumps({k: metrics[k] for k in ("protocol", "split", "step", "questions",
                                              "overall", "open", "closed")}))


if __name__ == "__main__":
  common.run(main)
