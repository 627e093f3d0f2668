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
# Each worker's output is also in its ${TMPDIR:-/tmp}/medvqa-jax-tpu-pod.log, which the run
# writes, not the ssh session: ending the sessions does not stop (or break) the run. Ctrl-C,
# or SIGTERM to this script, sends the command on every worker SIGTERM: the run saves the
# step it reached and stops; the same command resumes it. `launch/tpu_pod.sh --stop` (TPU and
# ZONE set) does the same from any shell.
set -euo pipefail
usage() { sed -n '2,/^[^#]/p' "$0" | grep '^#' | grep -v '^#SBATCH' | sed 's/^# \{0,1\}//'; }
if [ $# -eq 0 ]; then usage >&2; exit 2; fi
case "$1" in -h|--help) usage; exit 0 ;; esac
: "${TPU:?set TPU to the TPU VM name}"
: "${ZONE:?set ZONE to its zone}"
REPO="${REPO:-\$HOME/medvqa-jax}"
# Each worker writes its command's process id and output to files of its own.
PIDFILE='${TMPDIR:-/tmp}/medvqa-jax-tpu-pod.pid'
LOG='${TMPDIR:-/tmp}/medvqa-jax-tpu-pod.log'
on_workers() { gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$1"; }
stop() {
  echo "tpu_pod.sh: sending SIGTERM to the command on every worker of $TPU" >&2
  # Only to a process launched here (a finished run's id may since have been reused).
  on_workers "p=\$(cat $PIDFILE 2>/dev/null) && grep -qzx MEDVQA_DISTRIBUTED=1 \
/proc/\$p/environ 2>/dev/null && kill -TERM \$p; true" ||
    echo "tpu_pod.sh: the stop command failed on a worker; check it there" >&2
}
if [ "$1" = --stop ]; then stop; exit 0; fi
printf -v CMD '%q ' "$@"
# On a worker: the command in the background, writing to the log (exec keeps its id), the
# log followed until it ends (tail dies with the session, the command does not), and the
# command's exit status returned.
WORKER="cd \"$REPO\" || exit 1; export MEDVQA_DISTRIBUTED=1; : > $LOG; (exec $CMD) >> $LOG 2>&1 \
< /dev/null & p=\$!; echo \$p > $PIDFILE; tail -n +1 -f --pid=\$p $LOG & wait \$p; s=\$?; wait; \
exit \$s"
# gcloud runs in the background, so that a signal to this script is handled at once (bash
# runs traps only between foreground commands); the terminal stays its input (<&0).
trap 'trap - INT TERM; stop; if [ -n "${ssh:-}" ]; then kill "$ssh" 2>/dev/null || true; fi
      exit 130' INT TERM
on_workers "$WORKER" <&0 &
ssh=$!
wait "$ssh"
