#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md: each line below is one launch/benchmark.py run (its own
# process and compilation); the JSON lines are appended to $OUT_FILE (default
# benchmarks/results.jsonl) and a short table is printed at the end.
#
#   bash benchmarks/gpu.sh            # all runs, most important first
#   bash benchmarks/gpu.sh 2          # only the first 2
#   bash benchmarks/gpu.sh 3-4        # runs 3 and 4
#   bash benchmarks/gpu.sh 0          # no run: the table of $OUT_FILE
#
# A run's leading NAME=value words are its environment (run 10 sets XLA_FLAGS); the table's
# last column shows a row's other settings: config overrides beyond attention, scan and remat,
# and XLA_FLAGS.
#
# Each run has 420 s, or until STEP_END (seconds since the epoch, as gpu_session.sh sets it)
# if sooner; a run that would get under 30 s is skipped. With PROFILE_DIR set, each run also
# traces 5 steps into PROFILE_DIR/run<N> and prints where the device's time goes.
set -uo pipefail
if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT_FILE=${OUT_FILE:-benchmarks/results.jsonl}
RANGE=${1:-100}
if ! [[ $RANGE =~ ^[0-9]+(-[0-9]+)?$ ]]; then
  echo "error: '$RANGE': give N (the first N runs) or A-B (runs A to B), e.g. 2 or 9-12" >&2
  exit 2
fi
case $RANGE in
  *-*) FIRST=${RANGE%-*}; LAST=${RANGE#*-} ;;
  *) FIRST=1; LAST=$RANGE ;;
esac
PAPER=":image=paper_init,text=paper_init"
RUNS=(
  "--config=configs/towers_only.py --config.model.compute.attention=cudnn"
  "--config=configs/towers_only.py --config.model.compute.attention=reference"
  "--config=configs/pretrain_stage1.py$PAPER --batch_size=64 --config.model.compute.attention=cudnn"
  # A fixed Sinkhorn budget: min = max iterations makes OTT run a lax.scan (no convergence test);
  # 100, the configs' max_iterations: the most the default run to threshold can cost.
  "--config=configs/pretrain_stage1.py$PAPER --batch_size=64 --config.model.compute.attention=cudnn --config.losses.ot.min_iterations=100 --config.losses.ot.max_iterations=100"
  "--config=configs/vqa_rad.py$PAPER --batch_size=64 --config.model.compute.attention=cudnn"
  "--config=configs/towers_only.py --config.model.compute.attention=cudnn --config.model.compute.scan=True"
  "--config=configs/towers_only.py --config.model.compute.attention=cudnn --config.model.compute.remat=dots --batch_size=512"
  # Scanned alone, towers_only ran 32% slower with twice the memory (H200): are the scan's
  # saved residuals the cause? With remat=dots it keeps only matrix products' outputs.
  "--config=configs/towers_only.py --config.model.compute.attention=cudnn --config.model.compute.scan=True --config.model.compute.remat=dots"
  # Where the H200 profiles lose time (BENCHMARKS.md, second session): pads around each fused
  # call (2% of towers_only), elementwise fusions beside the matrix products (34-41%: XLA's
  # dot merger, which makes one product of those that share an input and slices its result
  # apart, off), fixed costs per step (the fine-tuning step's 5,000 kernels, a third of them
  # small: at 128 they serve twice the examples), dropout's random bits (ThreeFry's kernel
  # took 3.6% of fine-tuning; the hash is now in-line: is XLA's RngBitGenerator still
  # cheaper?). Not tried: --xla_gpu_enable_cudnn_layer_norm, which compiles to the same
  # program (its pattern has no clip of the variance; flax's layer norm has one).
  "--config=configs/towers_only.py --config.model.compute.attention=cudnn --config.model.compute.pad_to=2"
  "XLA_FLAGS=--xla_disable_hlo_passes=dot-merger --config=configs/towers_only.py --config.model.compute.attention=cudnn"
  "--config=configs/vqa_rad.py$PAPER --batch_size=128 --config.model.compute.attention=cudnn"
  "--config=configs/vqa_rad.py$PAPER --batch_size=64 --config.model.compute.attention=cudnn --config.train.rng=rbg"
  # XLA's deterministic kernels and no autotuning (train.deterministic): against run 5.
  "--config=configs/vqa_rad.py$PAPER --batch_size=64 --config.model.compute.attention=cudnn --config.train.deterministic=True"
)
n=0
for args in "${RUNS[@]}"; do
  n=$((n + 1)); [ "$n" -gt "$LAST" ] && break
  [ "$n" -lt "$FIRST" ] && continue
  t=420
  if [ -n "${STEP_END:-}" ] && [ $(( STEP_END - $(date +%s) )) -lt $t ]; then
    t=$(( STEP_END - $(date +%s) ))
  fi
  if [ "$t" -lt 30 ]; then
    echo "== skipped ($t s left): $args" >&2
    continue
  fi
  prof=()
  [ -n "${PROFILE_DIR:-}" ] && prof=("--profile_dir=$PROFILE_DIR/run$n")
  # Leading NAME=value words are the run's environment (e.g. XLA_FLAGS).
  envs=() flags=()
  for word in $args; do
    if [ ${#flags[@]} -eq 0 ] && [[ $word =~ ^[A-Z_][A-Z0-9_]*= ]]; then envs+=("$word")
    else flags+=("$word"); fi
  done
  echo "== $args ${prof[*]}" >&2
  # --foreground: the run stays in this script's process group, so that a timeout of the
  # script (gpu_session.sh's) ends it too.
  env "${envs[@]}" timeout --foreground -k 10 "$t" "$PYTHON" launch/benchmark.py "${flags[@]}" \
    --steps=20 "${prof[@]}" | tee -a "$OUT_FILE" || echo "(failed: $args)" >&2
done
"$PYTHON" - "$OUT_FILE" <<'PY'
import json, os, sys
if not os.path.exists(sys.argv[1]):
  sys.exit(f"no results yet in {sys.argv[1]}")
print(f"{'config':58} {'attn':9} {'scan':5} {'remat':5} {'batch':>5} {'step ms':>8} {'samples/s':>9} "
      f"{'MFU':>6} {'GiB':>6} {'sinkhorn':>8} {'budget':>9} {'conv':>5} {'data':>6} {'pipe ms':>8} "
      f"other settings")
shown = ("attention", "scan", "remat")
for line in open(sys.argv[1]):
  r = json.loads(line)
  pct = lambda x: "-" if x is None else f"{100 * x:.1f}%"
  pipe = r.get("pipeline_step_s")
  gib = "-" if r.get("peak_memory_gib") is None else f"{r['peak_memory_gib']:.1f}"
  # The Sinkhorn share's budget ("fixed 100", or "threshold": a lower bound).
  budget = (r.get("sinkhorn_budget") or "-").replace("to threshold", "threshold").split(" (")[0]
  print(f"{r['config'][:58]:58} {r['attention']:9} {str(r['scan']):5} {r['remat']:5} "
        f"{r['batch_size']:>5} {1000 * r['step_s']:8.1f} {r['samples_per_s']:9.1f} "
        f"{pct(r['mfu']):>6} {gib:>6} {pct(r['sinkhorn_share']):>8} {budget[:9]:>9} "
        f"{pct(r.get('step_wpa_converged')):>5} {pct(r.get('data_share')):>6} "
        f"{'-' if pipe is None else f'{1000 * pipe:.1f}':>8} "
        + " ".join([o.removeprefix("--config.") for o in r.get("overrides") or []
                    if o.split("=")[0].rsplit(".", 1)[-1] not in shown]
                   + ([f"XLA_FLAGS={r['xla_flags']}"] if r.get("xla_flags") else [])))
PY
