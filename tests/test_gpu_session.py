"""benchmarks/gpu_session.sh: the GPU measurements of BENCHMARKS.md and RESULTS.md in one
budgeted call. On the CPU: its plan, its refusal of an unknown step, and a real run of the
step that needs no accelerator (the input pipelines) beside a step that does not fit the
budget."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import flax
import jax

import helpers
from medvqa_jax import ASSETS

ROOT = Path(__file__).resolve().parents[1]
# One call of the default budget reaches the first three (the environment, the traced
# fine-tuning and stage-1 steps); the others follow in the next.
STEPS = ["check", "finetune", "stage1", "towers", "tune", "kernels", "repeat", "real_slake",
         "real_vqa_rad", "input", "towers_more"]


def _documented_workers() -> str:
  """The input workers gpu_session.sh gives its fine-tunes by default, as its --help says."""
  return re.search(r"WORKERS \((\d+)\)", _session(["--help"]).stdout).group(1)


def _session(args, **env):
  # Not the checkout's own pack/ (ignored; it may hold an archive, which would be unpacked).
  return subprocess.run(["bash", "benchmarks/gpu_session.sh", *args], cwd=ROOT,
                        env={**os.environ, "PYTHON": sys.executable, "PACK": os.devnull, **env},
                        capture_output=True, text=True, timeout=600)


def test_the_plan_lists_every_step_in_order_and_runs_nothing(tmp_path):
  out = _session(["--plan"], OUT_DIR=str(tmp_path / "out"), DATA=str(tmp_path / "data"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert re.findall(r"^== (\w+) \(", out.stdout, re.M) == STEPS
  commands = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
  for expected in ("MEDVQA_FUSED_ATTENTION=cudnn", "benchmarks/gpu.sh 1-2",
                   "benchmarks/gpu.sh 3-4", "benchmarks/gpu.sh 6-8", "benchmarks/gpu.sh 9-13",
                   "benchmarks/real_data.sh vqa_rad", "benchmarks/real_data.sh slake",
                   f"--pipeline --config.model.compute.attention=cudnn "
                   f"--config.data.source_dir={tmp_path / 'data'}/vqa_rad",
                   "--dataset=captions_jsonl --augmentation=pretrain --workers=0,8,14",
                   "--profile_dir=runs/real/profiles/finetune"):
    assert sum(expected in c for c in commands) == 1, expected
  # The benchmarks build VQA-RAD at the config's max_side in a folder of their own: in the
  # fine-tunes' folder, real_data.sh then trained on that build, not at its MAX_SIDE (224).
  assert [c for c in commands if "runs/real/data" in c] == []
  assert sum("runs/real/bench_data" in c for c in commands) == 2
  # The headline benchmark runs are traced: towers_only's and stage 1's, not scan/remat's,
  # outside the results folder (a device host sends back what is under it, traces too).
  assert sum("PROFILE_DIR=runs/real/profiles" in c for c in commands) == 2
  # Each fine-tune step runs its own dataset, its line in OUT_DIR/real_data.jsonl, fed by the
  # session's WORKERS (its header's default; real_data.sh's own is another).
  by_step = {}
  for line in out.stdout.splitlines():
    if (m := re.match(r"== (\w+) \(", line)):
      step = by_step.setdefault(m.group(1), [])
    elif line.startswith("+ "):
      step.append(line)
  workers = _documented_workers()
  for dataset in ("slake", "vqa_rad"):
    assert by_step[f"real_{dataset}"] == [
        f"+ env RESULTS={tmp_path / 'out'}/real_data.jsonl WORKERS={workers} "
        f"bash benchmarks/real_data.sh {dataset}"]
  # The repeat step: the demo's step twice as XLA compiles it, twice with its deterministic
  # kernels, on the GPU's own kernels (cuDNN attention, bf16).
  repeat = by_step["repeat"]
  assert [c.endswith("--config.train.deterministic=False") for c in repeat] == [True] * 2 + \
      [False] * 2
  assert all(c.endswith("--config.train.deterministic=True") for c in repeat[2:])
  for c in repeat:
    assert "launch/benchmark.py --config=configs/demo.py" in c
    assert ("--config.model.dtype=bfloat16 --config.model.image.dtype=bfloat16 "
            "--config.model.text.dtype=bfloat16 --config.model.compute.attention=cudnn") in c
  assert not (tmp_path / "out").exists()


def test_the_repeat_table_compares_each_settings_digests(tmp_path):
  """A stand-in for python plays launch/benchmark.py: its runs without train.deterministic
  end at two digests, those with it at one."""
  script = tmp_path / "bench.py"
  script.write_text(f"""import json, sys
from pathlib import Path
count = Path({str(tmp_path / "count")!r})
n = int(count.read_text()) if count.exists() else 0
count.write_text(str(n + 1))
det = "--config.train.deterministic=True" in sys.argv
print(json.dumps({{"params_sha1": "same" if det else f"run{{n}}", "step_s": 0.01 + 0.001 * n,
                  "overrides": [a for a in sys.argv if a.startswith("--config.")]}}))
""")
  fake = tmp_path / "python"
  fake.write_text(f"""#!/usr/bin/env bash
[ "$1" = launch/benchmark.py ] && {{ shift; exec {sys.executable} {script} "$@"; }}
exec {sys.executable} "$@"
""")
  fake.chmod(0o755)
  out = _session(["repeat"], PYTHON=str(fake), OUT_DIR=str(tmp_path / "out"),
                 RUNS=str(tmp_path / "runs"))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert len((tmp_path / "out" / "repeat.jsonl").read_text().splitlines()) == 4
  rows = re.findall(r"^(False|True)\s+(\d+)\s+(\S+)\s+(\S+)$", out.stdout, re.M)
  assert rows == [("False", "2", "False", "10.0/11.0"), ("True", "2", "True", "12.0/13.0")]


def test_an_unknown_step_is_refused():
  out = _session(["towers", "tower"])
  assert out.returncode == 2
  assert "unknown step 'tower'" in out.stderr and "towers_more" in out.stderr


def test_the_input_step_runs_and_a_step_over_budget_is_skipped(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  (data / "vqa_rad").symlink_to(ASSETS / "vqa_rad_sample")
  out_dir = tmp_path / "out"
  # What an earlier call installed (RUNS/site) is on the path of every step's Python: a
  # sitecustomize there runs at each start-up and leaves a mark.
  site = tmp_path / "runs" / "site"
  site.mkdir(parents=True)
  mark = tmp_path / "site_seen"
  (site / "sitecustomize.py").write_text(f"open({str(mark)!r}, 'a').write('x')\n")
  out = _session(["towers", "input"], DATA=str(data), RUNS=str(tmp_path / "runs"),
                 OUT_DIR=str(out_dir), INPUT_WORKERS="0,1", INPUT_BATCHES="2",
                 INPUT_BATCH="4", NEED_towers="1000000")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  lines = [json.loads(line) for line in (out_dir / "input.jsonl").read_text().splitlines()]
  # Both runs at INPUT_BATCH, the caption corpus's too.
  assert [(r["dataset"], r["augmentation"], r["views"], r["batch_size"]) for r in lines] == [
      ("vqa_rad", "finetune", 1, 4), ("captions_jsonl", "pretrain", 2, 4)]
  for r in lines:
    assert [x["workers"] for x in r["results"]] == [0, 1]
    assert all(x["images_per_s"] > 0 for x in r["results"])
  # The table at the end: a row per run and worker count, images/s and that over the workers
  # (in-process, 0 workers: over one; test_the_input_table_divides_by_the_workers for more).
  rows = re.findall(r"^(vqa_rad|captions_jsonl)\s+(\w+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$",
                    out.stdout, re.M)
  assert len(rows) == 4
  for (dataset, aug, workers, rate, per_worker), (r, x) in zip(
      rows, [(r, x) for r in lines for x in r["results"]]):
    assert (dataset, aug, int(workers), float(rate)) == (
        r["dataset"], r["augmentation"], x["workers"], x["images_per_s"])
    assert abs(float(per_worker) - float(rate) / max(int(workers), 1)) <= 0.1
  # The results folder holds the results only (the device sends back a few files).
  assert sorted(p.name for p in out_dir.iterdir()) == ["input.jsonl", "session.log"]
  # The caption corpus: one row per training image, its path relative to the file.
  corpus = tmp_path / "runs" / "corpus" / "train.jsonl"
  rows = [json.loads(line) for line in corpus.read_text().splitlines()]
  questions = json.loads((ASSETS / "vqa_rad_sample" / "trainset.json").read_text())
  assert sorted(r["id"] for r in rows) == sorted({q["image_name"] for q in questions})
  assert all((corpus.parent / r["image"]).is_file() and r["caption"] for r in rows)
  # The skipped step is named, ran nothing, and the table summarises what did run.
  log = (out_dir / "session.log").read_text()
  assert "== towers: skipped" in log and "skipped: towers" in log.splitlines()[-1]
  assert not (out_dir / "benchmarks.jsonl").exists()
  assert re.search(r"^captions_jsonl\s+pretrain\s+1\s+[\d.]+", out.stdout, re.M)
  assert f"== packages from {site}" in log and mark.read_text().count("x") >= 2


def test_the_input_table_divides_by_the_workers(tmp_path):
  """The input table's last column is a worker's share of images/s, which the run above
  (0 and 1 workers) cannot tell from images/s itself. A stand-in for python plays
  benchmark_input.py: a line of known rates for 8 and 14 workers."""
  import shlex
  line = json.dumps({"dataset": "vqa_rad", "augmentation": "finetune", "results": [
      {"workers": 8, "images_per_s": 960.0, "images_per_s_per_worker": 120.0},
      {"workers": 14, "images_per_s": 1400.0, "images_per_s_per_worker": 100.0}]})
  fake = tmp_path / "python"
  fake.write_text(f"""#!/usr/bin/env bash
[ "$1" = launch/benchmark_input.py ] && {{ echo {shlex.quote(line)}; exit 0; }}
exec {sys.executable} "$@"
""")
  fake.chmod(0o755)
  (tmp_path / "data" / "vqa_rad").mkdir(parents=True)
  (tmp_path / "data" / "vqa_rad" / "trainset.json").write_text("[]")
  out = _session(["input"], PYTHON=str(fake), DATA=str(tmp_path / "data"),
                 OUT_DIR=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  rows = re.findall(r"^vqa_rad\s+finetune\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", out.stdout, re.M)
  # Twice: the stand-in answers the caption corpus's run with the same line.
  assert rows == [("8", "960.0", "120.0"), ("14", "1400.0", "100.0")] * 2


def test_the_packs_archive_is_unpacked_and_read_by_the_slake_fine_tune(tmp_path):
  """What `pack.py --archive` writes (MiniLM and SLAKE in one compressed file, to fit a
  capped upload beside the wheels) is unpacked into the pack before any step, and the
  fine-tune reads the data and the checkpoint from there. A stand-in for python plays
  train.py and records its arguments."""
  pack_module = helpers.benchmark_script("pack")
  src, pack = tmp_path / "src", tmp_path / "pack"
  files = {"minilm/config.json": '{"model_type": "bert"}',
           "data/slake/Slake1.0/train.json": "[]", "data/vqa_rad/trainset.json": "[]"}
  for name, text in files.items():
    (src / name).parent.mkdir(parents=True, exist_ok=True)
    (src / name).write_text(text)
  archive = pack_module.write_archive(src)
  pack.mkdir()
  archive.rename(pack / archive.name)
  fake = tmp_path / "python"
  fake.write_text(f"""#!/usr/bin/env bash
case "$1" in
  launch/train.py) printf "%s\\n" "$@" > {tmp_path / "args"}; exit 1 ;;
  *) exec {sys.executable} "$@" ;;
esac
""")
  fake.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k not in ("DATA", "MINILM", "WORKERS")}
  # The plan unpacks nothing, but names the folders the run will read (from the archive's
  # member list: it named ../shared/data and the package's MiniLM), and which steps the
  # run will skip for want of their data.
  plan = subprocess.run(["bash", "benchmarks/gpu_session.sh", "--plan", "real_slake",
                         "finetune"], cwd=ROOT, env={**env, "PYTHON": str(fake), "PACK": str(pack)},
                        capture_output=True, text=True, timeout=120)
  assert plan.returncode == 0, plan.stderr[-3000:]
  assert f"DATA={pack}/data MINILM={pack}/minilm" in plan.stdout
  assert f"--config.data.source_dir={pack}/data/vqa_rad" in plan.stdout
  assert (f"== finetune: would be skipped (no {pack}/data/vqa_rad: carry pack/data/vqa_rad)"
          in plan.stdout)
  assert "real_slake: would be skipped" not in plan.stdout
  assert sorted(p.name for p in pack.iterdir()) == ["minilm_slake.tar.xz"]
  out = subprocess.run(["bash", "benchmarks/gpu_session.sh", "real_slake"], cwd=ROOT,
                       env={**env, "PYTHON": str(fake), "PACK": str(pack),
                            "OUT_DIR": str(tmp_path / "out"), "RUNS": str(tmp_path / "runs")},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  # Only what the archive holds: the VQA-RAD folder is carried as it is.
  assert sorted(str(p.relative_to(pack)) for p in pack.rglob("*") if p.is_file()) == [
      "data/slake/Slake1.0/train.json", "minilm/config.json", "minilm_slake.tar.xz"]
  assert (pack / "minilm" / "config.json").read_text() == files["minilm/config.json"]
  args = (tmp_path / "args").read_text().splitlines()
  assert f"--config.data.source_dir={pack}/data/slake" in args
  assert f"--config.model.text.checkpoint={pack}/minilm" in args
  # With the session's input workers, as its header documents them (real_data.sh's own
  # default is another).
  workers = _documented_workers()
  assert f"--config.data.workers={workers}" in args
  log = (tmp_path / "out" / "session.log").read_text()
  assert f"+ unpack {pack}/minilm_slake.tar.xz into {pack}" in log


def test_steps_whose_data_is_missing_are_skipped_before_they_start(tmp_path):
  """A host without ../shared/data reads what pack.py wrote; a step whose dataset was not
  carried failed after its start-up (the fine-tuning benchmark: in the build), named as an
  exit status. It is skipped up front, saying what to carry, and the others run."""
  fake = tmp_path / "python"
  fake.write_text(f"""#!/usr/bin/env bash
case "$1" in
  launch/*|-) echo "$1" >> {tmp_path / "ran"}; exit 0 ;;
  *) exec {sys.executable} "$@" ;;
esac
""")
  fake.chmod(0o755)
  data = tmp_path / "data"
  (data / "slake" / "Slake1.0").mkdir(parents=True)
  out = _session(["finetune", "real_slake", "input", "real_vqa_rad"], PYTHON=str(fake),
                 DATA=str(data), OUT_DIR=str(tmp_path / "out"), RUNS=str(tmp_path / "runs"))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  log = (tmp_path / "out" / "session.log").read_text()
  for step in ("finetune", "input", "real_vqa_rad"):
    assert f"== {step}: skipped (no {data}/vqa_rad: carry pack/data/vqa_rad)" in log
  assert "== real_slake (" in log and "launch/train.py" in (tmp_path / "ran").read_text()
  assert "launch/benchmark" not in (tmp_path / "ran").read_text()
  assert log.splitlines()[-1].endswith("skipped: finetune input real_vqa_rad")


def test_a_step_is_stopped_at_its_end_and_none_ends_past_the_budget(tmp_path):
  """A step runs until STEP_END: 1.5 x its need, or the time left if less. One that hangs is
  stopped there (timeout's exit status 124) and the session goes on; a step that starts near
  the end of the budget is told to end with it, not 1.5 x its need later. A stand-in for
  python hangs as the kernels' pytest and records the STEP_END each step is given."""
  import time
  fake = tmp_path / "python"
  fake.write_text(f"""#!/usr/bin/env bash
case "$1" in
  -m) echo "kernels $STEP_END" >> {tmp_path / "ends"}; exec sleep 30 ;;
  launch/benchmark.py) echo "finetune $STEP_END" >> {tmp_path / "ends"}; exit 0 ;;
  *) exec {sys.executable} "$@" ;;
esac
""")
  fake.chmod(0o755)
  (tmp_path / "data" / "vqa_rad").mkdir(parents=True)
  start = int(time.time())
  # kernels: until 3 s (1.5 x 2); finetune starts with about 37 s left, under 1.5 x 30.
  out = _session(["kernels", "finetune"], PYTHON=str(fake), BUDGET="40", NEED_kernels="2",
                 NEED_finetune="30", DATA=str(tmp_path / "data"), OUT_DIR=str(tmp_path / "out"),
                 RUNS=str(tmp_path / "runs"))
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  assert time.time() - start < 25  # Not the stand-in's 30 s.
  log = (tmp_path / "out" / "session.log").read_text()
  assert re.search(r"^== kernels: exit status 124, \d+ s$", log, re.M), log
  # (The session starts a second or two after `start`, at most.)
  ends = dict(line.split() for line in (tmp_path / "ends").read_text().splitlines())
  assert start + 3 <= int(ends["kernels"]) <= start + 3 + 5
  assert start + 30 <= int(ends["finetune"]) <= start + 40 + 5  # Not t0 + 45 (>= start + 48).
  assert log.splitlines()[-1].endswith("skipped: none")


def test_a_fine_tune_stopped_by_its_time_limit_is_evaluated_where_it_got(tmp_path):
  """real_data.sh within gpu_session.sh's STEP_END: training is stopped (SIGTERM) in time
  for the best checkpoint it reached to be evaluated on test, and the line says the run is
  not complete (a fine-tune cut off by the budget recorded nothing). A stand-in for python
  plays train.py (saves a checkpoint on SIGTERM, exit 130) and eval.py."""
  import time
  fake = tmp_path / "python"
  fake.write_text(f"""#!/usr/bin/env bash
case "$1" in
  launch/train.py)
    for a in "$@"; do case $a in --config.train.workdir=*) run=${{a#*=}};; esac; done
    trap 'mkdir -p "$run/checkpoints/7"; exit 130' TERM
    sleep 120 >/dev/null 2>&1 & wait $! ;;
  launch/eval.py)
    for a in "$@"; do case $a in --out=*) out=${{a#*=}};; esac; done
    mkdir -p "$out"
    echo '{{"step": 7, "overall": 0.5, "closed": 0.625, "open": 0.25,
           "by_yes_no": {{"closed": {{"accuracy": 0.75}}, "open": {{"accuracy": 0.125}}}},
           "majority_baseline": {{"overall": 0.3}}}}' > "$out/metrics.json" ;;
  *) exec {sys.executable} "$@" ;;
esac
""")
  fake.chmod(0o755)
  results = tmp_path / "real.jsonl"
  start = time.time()
  out = subprocess.run(["bash", "benchmarks/real_data.sh", "vqa_rad"], cwd=ROOT,
                       env={**os.environ, "PYTHON": str(fake), "RUNS": str(tmp_path / "runs"),
                            "RESULTS": str(results), "EVAL_RESERVE": "0",
                            # 15-16 s: training starts with more than the 10 s it needs
                            # on a loaded machine too.
                            "STEP_END": str(int(start) + 16)},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert time.time() - start < 60  # Stopped at its limit, not at the stand-in's 120 s.
  (line,) = [json.loads(x) for x in results.read_text().splitlines()]
  assert line["complete"] is False and line["metrics"]["step"] == 7
  assert re.search(r"runs/vqa_rad\s+7\*\s+50\.0\s+62\.5\s+25\.0\s+75\.0\s+12\.5\s+30\.0",
                   out.stdout)


def test_a_session_without_a_gpu_stops_at_its_check(tmp_path):
  """JAX falls back to the CPU when the GPU does not start; the session went on to compile
  paper-size models there."""
  out = _session(["check", "towers"], OUT_DIR=str(tmp_path / "out"), JAX_PLATFORMS="cpu")
  assert out.returncode == 1
  log = (tmp_path / "out" / "session.log").read_text()
  assert "== JAX sees no GPU (backend: cpu): stopping" in log
  # Before stopping, it names the software any figure would have been quoted with.
  (env,) = [json.loads(line) for line in log.splitlines() if line.startswith('{"python"')]
  assert env["devices"] == ["cpu"] and env["jax"] == jax.__version__
  assert env["flax"] == flax.__version__ and env["optax"] and env["orbax-checkpoint"]
  # And the host the input pipelines share.
  assert env["cpus"] == len(os.sched_getaffinity(0)) and 1 <= env["physical_cores"] <= env["cpus"]
  assert env["memory_gib"] > 0 and env["shm_gib"] == round(shutil.disk_usage("/dev/shm").total
                                                           / 2 ** 30, 1)
  assert "== towers" not in log and not (tmp_path / "out" / "benchmarks.jsonl").exists()


def test_the_benchmark_table_tells_the_sinkhorn_budgets_apart(tmp_path):
  """Stage 1 runs twice, its Sinkhorn to threshold (a lower bound) and on a fixed budget (the
  share to quote): their rows differed only in that share."""
  results = tmp_path / "bench.jsonl"
  row = dict(config="configs/pretrain_stage1.py", attention="cudnn", scan=False, remat="none",
             batch_size=64, step_s=0.5, samples_per_s=128.0, mfu=0.3, peak_memory_gib=40.0,
             step_wpa_converged=1.0)
  results.write_text("".join(json.dumps({**row, **extra}) + "\n" for extra in (
      dict(sinkhorn_share=0.05, sinkhorn_budget="to threshold (a lower bound: random tokens)"),
      dict(sinkhorn_share=0.21, sinkhorn_budget="fixed 100"))))
  out = subprocess.run(["bash", "benchmarks/gpu.sh", "0"], cwd=ROOT,
                       env={**os.environ, "PYTHON": sys.executable, "OUT_FILE": str(results)},
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 0, out.stderr[-3000:]
  header, *rows = out.stdout.splitlines()
  assert "budget" in header.split()
  assert re.search(r" 5\.0% +threshold ", rows[0]) and re.search(r" 21\.0% +fixed 100 ", rows[1])
  # A range that is not one ran every benchmark ("[: foo: integer expression expected").
  for bad in ("foo", "3-x"):
    out = subprocess.run(["bash", "benchmarks/gpu.sh", bad], cwd=ROOT,
                         env={**os.environ, "PYTHON": "false", "OUT_FILE": str(results)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and f"error: '{bad}': give N" in out.stderr, out.stderr


def test_benchmark_runs_that_would_outlast_the_step_are_skipped(tmp_path):
  """gpu.sh ends its runs by STEP_END too: a run left under 30 s is skipped, not started
  (a run cut by gpu_session.sh's own timeout kept the GPU and the log open)."""
  import time
  results = tmp_path / "bench.jsonl"
  results.write_text("")
  out = subprocess.run(["bash", "benchmarks/gpu.sh", "1"], cwd=ROOT,
                       env={**os.environ, "PYTHON": sys.executable, "OUT_FILE": str(results),
                            "STEP_END": str(int(time.time()) + 20)},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  assert re.search(r"== skipped \(\d+ s left\): --config=configs/towers_only.py", out.stderr)
  assert results.read_text() == ""


def test_a_fine_tune_killed_for_memory_says_so(tmp_path):
  """The recipe's batch of 64 outgrows a 24 GB CPU machine; the kernel's OOM killer ends
  train.py with SIGKILL (exit status 137), which is named with a way out."""
  fake = tmp_path / "python"
  fake.write_text("#!/usr/bin/env bash\nkill -KILL $$\n")
  fake.chmod(0o755)
  out = subprocess.run(["bash", "benchmarks/real_data.sh", "vqa_rad"], cwd=ROOT,
                       env={**os.environ, "PYTHON": str(fake), "RUNS": str(tmp_path / "runs"),
                            "RESULTS": str(tmp_path / "real.jsonl")},
                       capture_output=True, text=True, timeout=60)
  assert "(failed: vqa_rad, exit status 137: killed (SIGKILL), most likely out of memory" in (
      out.stderr)
  assert "BATCH=16" in out.stderr and not (tmp_path / "real.jsonl").exists()
  assert out.returncode == 1
  # Failed beside an earlier result: the table of that, and still a failure (it exited 0).
  line = {"run": "runs/real/slake", "wall_s": 9, "device": "cpu",
          "metrics": {"step": 3, "overall": 0.5, "closed": 0.5, "open": 0.5,
                      "majority_baseline": {"overall": 0.25}}}
  (tmp_path / "real.jsonl").write_text(json.dumps(line) + "\n")
  fake.write_text(f'#!/usr/bin/env bash\n[ "$1" = launch/train.py ] && kill -KILL $$\n'
                  f'exec {sys.executable} "$@"\n')
  out = subprocess.run(["bash", "benchmarks/real_data.sh", "vqa_rad"], cwd=ROOT,
                       env={**os.environ, "PYTHON": str(fake), "RUNS": str(tmp_path / "runs"),
                            "RESULTS": str(tmp_path / "real.jsonl")},
                       capture_output=True, text=True, timeout=60)
  assert out.returncode == 1 and "failed: vqa_rad (above)" in out.stderr
  # A line written before the yes/no columns: "-" there.
  assert re.search(r"runs/real/slake\s+3\s+50\.0\s+50\.0\s+50\.0\s+-\s+-\s+25\.0", out.stdout)


def test_the_recipe_slows_what_comes_from_minilm_only(tmp_path):
  """real_data.sh's learning-rate rule: 0.1x for the text tower and the decoder's layers
  copied from the same checkpoint (the decoder once trained at 10x the text tower's rate),
  the base rate for the decoder's new cross-attention and LM head and everything else."""
  import ast

  import jax
  from configs import vqa_rad
  from medvqa_jax.models import amif
  from medvqa_jax.models.state_dict import flatten
  from medvqa_jax.train import optim
  fake = tmp_path / "python"
  fake.write_text(f'#!/usr/bin/env bash\nprintf "%s\\n" "$@" >> {tmp_path / "args"}\nexit 1\n')
  fake.chmod(0o755)
  out = subprocess.run(["bash", "benchmarks/real_data.sh", "vqa_rad"], cwd=ROOT,
                       env={**os.environ, "PYTHON": str(fake), "RUNS": str(tmp_path / "runs"),
                            "RESULTS": str(tmp_path / "real.jsonl")},
                       capture_output=True, text=True, timeout=60)
  assert "(failed: vqa_rad, exit status 1)" in out.stderr
  (rule,) = [a.split("=", 1)[1] for a in (tmp_path / "args").read_text().splitlines()
             if a.startswith("--config.optim.lr_mults=")]
  config = vqa_rad.get_config("image=tiny,text=tiny")
  model, init, loaded = amif.initializer(config, seed=0)
  labels = flatten(optim.param_labels(jax.eval_shape(init, loaded), ast.literal_eval(rule)))
  slow = {k for k, v in labels.items() if v == "lr_x0.1"}
  assert {k for k in labels if k.startswith("text/")} <= slow
  assert "decoder/word_embed/embedding" in slow and "decoder/layer_0/attn/query/kernel" in slow
  fresh = [k for k in labels if k.startswith("decoder/") and ("cross_" in k or "/lm_" in k)]
  assert fresh and not slow & set(fresh)
  assert not [k for k in slow if not k.startswith(("text/", "decoder/"))]


def test_real_data_runs_with_the_settings_its_header_documents(tmp_path):
  """real_data.sh's defaults are those its header (--help) names, read from there: the
  results of RESULTS.md are quoted with them. A setting given replaces its default
  (EPOCHS: the config's epochs, else left as they are), and within STEP_END training is
  given all but the documented EVAL_RESERVE, kept for the test evaluation. A stand-in for
  python plays train.py (fails at once) and records its arguments."""
  import time

  from configs import slake, vqa_rad
  doc = subprocess.run(["bash", "benchmarks/real_data.sh", "--help"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60).stdout
  doc = " ".join(doc.split())
  find = lambda pattern: re.search(pattern, doc).group(1)
  documented = {
      "--config.data.max_side": find(r"MAX_SIDE \(images shrunk to this shorter side when the "
                                     r"dataset is built, (\d+),"),
      "--config.optim.lr": find(r" LR \(([\d.e-]+)\)"),
      "--config.train.batch_size": find(r" BATCH \((\d+);"),
      "--config.data.workers": find(r" WORKERS \(input-pipeline processes, (\d+)\)"),
      "--config.train.eval_every": find(r" EVAL_EVERY \((\d+) steps;"),
      "--config.model.compute.attention": find(r" ATTENTION \(.*?, default (\w+)\)")}
  reserve = int(find(r"EVAL_RESERVE s \((\d+)\)"))
  epochs = re.search(r"EPOCHS \(default: the dataset config's, (\d+) VQA-RAD / (\d+) SLAKE",
                     doc).groups()
  for module, n in zip((vqa_rad, slake), epochs):
    assert module.get_config("image=vit_s16_scratch,text=minilm").train.epochs == int(n)
  fake = tmp_path / "python"
  fake.write_text(f'#!/usr/bin/env bash\n[ "$1" = launch/train.py ] && '
                  f'printf "%s\\n" "$@" > {tmp_path / "args"}\nexit 1\n')
  fake.chmod(0o755)
  settings = ("MAX_SIDE", "LR", "BATCH", "WORKERS", "EVAL_EVERY", "ATTENTION", "EPOCHS",
              "STEPS", "TEXT_LR_MULT", "EVAL_RESERVE", "STEP_END", "MINILM")
  env = {k: v for k, v in os.environ.items() if k not in settings}

  def run(dataset, **extra):
    out = subprocess.run(["bash", "benchmarks/real_data.sh", dataset], cwd=ROOT,
                         env={**env, "PYTHON": str(fake), "RUNS": str(tmp_path / "runs"),
                              "RESULTS": str(tmp_path / "real.jsonl"), **extra},
                         capture_output=True, text=True, timeout=60)
    assert f"(failed: {dataset}, exit status 1)" in out.stderr, out.stderr
    args = (tmp_path / "args").read_text().splitlines()
    return out, dict(a.split("=", 1) for a in args if a.startswith("--config."))

  out, args = run("vqa_rad", STEP_END=str(int(time.time()) + reserve + 30))
  assert {k: args[k] for k in documented} == documented
  assert float(args["--config.optim.lr"]) == float(documented["--config.optim.lr"])
  assert "--config.train.epochs" not in args
  (limit,) = re.findall(r"== vqa_rad: timeout --foreground -k 60 (\d+) ", out.stderr)
  assert 15 <= int(limit) <= 30, out.stderr  # Not 30 + 90.
  out, args = run("slake", EPOCHS="3", MAX_SIDE="128", LR="3e-4")
  assert args["--config.train.epochs"] == "3" and args["--config.data.max_side"] == "128"
  assert args["--config.optim.lr"] == "3e-4"
  assert "timeout" not in out.stderr  # Without STEP_END, no limit.


def test_a_run_gets_its_environment_and_the_table_names_what_else_it_set(tmp_path):
  """gpu.sh's run 10 tries an XLA flag: the leading NAME=value words reach the benchmark's
  environment, not its arguments, and the table's last column tells the rows apart."""
  results = tmp_path / "bench.jsonl"
  fake = tmp_path / "python"
  # The benchmark, faked: one line saying what it was given; the table: the real Python.
  fake.write_text(f"""#!/usr/bin/env bash
if [ "$1" = launch/benchmark.py ]; then
  shift
  exec {sys.executable} -c 'import json, os, sys
print(json.dumps(dict(config="configs/towers_only.py", attention="cudnn", scan=False,
  remat="none", batch_size=256, step_s=0.09, samples_per_s=2844.4, mfu=0.35,
  peak_memory_gib=21.0, sinkhorn_share=None, overrides=[a for a in sys.argv[1:] if a.startswith("--config.")],
  xla_flags=os.environ.get("XLA_FLAGS"), argv=sys.argv[1:])))' "$@"
fi
exec {sys.executable} "$@"
""")
  fake.chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  out = subprocess.run(["bash", "benchmarks/gpu.sh", "9-10"], cwd=ROOT,
                       env={**env, "PYTHON": str(fake), "OUT_FILE": str(results)},
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  pad, lt = [json.loads(line) for line in results.read_text().splitlines()]
  assert pad["xla_flags"] is None and "--config.model.compute.pad_to=2" in pad["argv"]
  assert lt["xla_flags"] == "--xla_disable_hlo_passes=dot-merger"
  assert not any("XLA_FLAGS" in a for a in lt["argv"]) and "--steps=20" in lt["argv"]
  lines = out.stdout.splitlines()  # The runs' own lines (tee), then the table.
  rows = lines[next(i for i, x in enumerate(lines) if x.startswith("config ")) + 1:]
  assert len(rows) == 2 and rows[0].endswith(" model.compute.pad_to=2")  # attention is a column of its own.
  assert rows[1].endswith(" XLA_FLAGS=--xla_disable_hlo_passes=dot-merger")
