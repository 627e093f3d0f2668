#!/usr/bin/env bash
# Runs one command on every worker of a TPU VM pod slice, with MEDVQA_DISTRIBUTED=1 so that
# each joins the others (jax.distributed.initialize(); JAX reads the slice from the VM's
# metadata) and feeds its share of the global batch. Usage, from your workstation:
#
#   TPU=my-v5p-64 ZONE=us-east5-a launch/tpu_pod.sh \
#       python launch/train.py --config=configs/pathvqa.py \
#       --config.data.dir=/mnt/shared/tfds --config.train.workdir=/mnt/shared/runs/pathvqa
#
# The repository must be at the same path on every worker (e.g. cloned by a startup script)
# with `pip install -e .` done there: REPO=/that/path (default: $HOME/medvqa-jax, $HOME
# being the worker's). Data and work folders must be readable/writable by all
# workers at the same path: a shared filesystem (e.g. Filestore over NFS, or a GCS bucket
# mounted with gcsfuse). Paths are file paths: a gs:// URL is refused.
#
# Ctrl-C here would only end the ssh sessions, leaving the workers training (and the TPU
# busy). So it also sends the command on every worker SIGTERM: the run saves the step it
# reached and stops; the same command resumes it. `launch/tpu_pod.sh --stop` (TPU and ZONE
# set) does the same from any shell.
set -euo pipefail
usage() { sed -n '2,/^[^#]/p' "$0" | grep '^#' | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'; }
if [ $# -eq 0 ]; then usage >&2; exit 2; fi
case "$1" in -h|--help) usage; exit 0 ;; esac
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
REPO="${REPO:-\$HOME/medvqa-jax}"
# Each worker's command writes its process id to this file of its own (exec keeps the id).
PIDFILE='${TMPDIR:-/tmp}/medvqa-jax-tpu-pod.pid'
on_workers() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
stop() {
  echo "tpu_pod.sh: sending SIGTERM to the command on every worker of $TPU" >&2
  # Only to a process launched here (a finished run's id may since have been reused).
  on_workers "p=\$(cat $PIDFILE 2>/dev/null) && grep -qzx MEDVQA_DISTRIBUTED=1 \
/proc/\$p/environ 2>/dev/null && kill -TERM \$p; true"
}
if [ "$1" = --stop ]; then stop; exit 0; fi
printf -v CMD '%q ' "$@"
trap 'trap - INT TERM; stop; exit 130' INT TERM
on_workers "cd $REPO && echo \$\$ > $PIDFILE && export MEDVQA_DISTRIBUTED=1 && exec $CMD"
