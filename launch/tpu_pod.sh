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
set -euo pipefail
usage() { sed -n '2,/^[^#]/p' "$0" | grep '^#' | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'; }
if [ $# -eq 0 ]; then usage >&2; exit 2; fi
case "$1" in -h|--help) usage; exit 0 ;; esac
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
REPO="${REPO:-\$HOME/medvqa-jax}"
printf -v CMD '%q ' "$@"
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all \
    --command="cd $REPO && MEDVQA_DISTRIBUTED=1 $CMD"
