"""benchmarks/gpu_session.sh: the GPU measurements of BENCHMARKS.md and RESULTS.md in one
budgeted call. On the CPU: its plan, its refusal of an unknown step, and a real run of the
step that needs no accelerator (the input pipelines) beside a step that does not fit the
budget."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from medvqa_jax import ASSETS

ROOT = Path(__file__).resolve().parents[1]
STEPS = ["check", "towers", "real_vqa_rad", "stage1", "finetune", "input", "real_slake",
         "towers_more"]


def _session(args, **env):
  return subprocess.run(["bash", "benchmarks/gpu_session.sh", *args], cwd=ROOT,
                        env={**os.environ, "PYTHON": sys.executable, **env},
                        capture_output=True, text=True, timeout=600)


def test_the_plan_lists_every_step_in_order_and_runs_nothing(tmp_path):
  out = _session(["--plan"], OUT_DIR=str(tmp_path / "out"), DATA=str(tmp_path / "data"))
  assert out.returncode == 0, out.stderr[-2000:]
  assert re.findall(r"^== (\w+) \(", out.stdout, re.M) == STEPS
  commands = [line for line in out.stdout.splitlines() if line.startswith("+ ")]
  for expected in ("MEDVQA_FUSED_ATTENTION=cudnn", "benchmarks/gpu.sh 1-2",
                   "benchmarks/gpu.sh 3-4", "benchmarks/gpu.sh 6-7",
                   "benchmarks/real_data.sh vqa_rad", "benchmarks/real_data.sh slake",
                   f"--pipeline --config.model.compute.attention=cudnn "
                   f"--config.data.source_dir={tmp_path / 'data'}/vqa_rad",
                   "--dataset=captions_jsonl --augmentation=pretrain --workers=0,8,14"):
    assert sum(expected in c for c in commands) == 1, expected
  assert not (tmp_path / "out").exists()


def test_an_unknown_step_is_refused():
  out = _session(["towers", "tower"])
  assert out.returncode == 2
  assert "unknown step 'tower'" in out.stderr and "towers_more" in out.stderr


def test_the_input_step_runs_and_a_step_over_budget_is_skipped(tmp_path):
  data = tmp_path / "data"
  data.mkdir()
  (data / "vqa_rad").symlink_to(ASSETS / "vqa_rad_sample")
  out_dir = tmp_path / "out"
  out = _session(["towers", "input"], DATA=str(data), RUNS=str(tmp_path / "runs"),
                 OUT_DIR=str(out_dir), INPUT_WORKERS="0,1", INPUT_BATCHES="2",
                 INPUT_BATCH="4", NEED_towers="1000000")
  assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
  lines = [json.loads(line) for line in (out_dir / "input.jsonl").read_text().splitlines()]
  assert [(r["dataset"], r["augmentation"], r["views"]) for r in lines] == [
      ("vqa_rad", "finetune", 1), ("captions_jsonl", "pretrain", 2)]
  for r in lines:
    assert [x["workers"] for x in r["results"]] == [0, 1]
    assert all(x["images_per_s"] > 0 for x in r["results"])
  # The caption corpus: one row per training image, its path relative to the file.
  corpus = out_dir / "corpus" / "train.jsonl"
  rows = [json.loads(line) for line in corpus.read_text().splitlines()]
  questions = json.loads((ASSETS / "vqa_rad_sample" / "trainset.json").read_text())
  assert sorted(r["id"] for r in rows) == sorted({q["image_name"] for q in questions})
  assert all((corpus.parent / r["image"]).is_file() and r["caption"] for r in rows)
  # The skipped step is named, ran nothing, and the table summarises what did run.
  log = (out_dir / "session.log").read_text()
  assert "== towers: skipped" in log and "skipped: towers" in log.splitlines()[-1]
  assert not (out_dir / "benchmarks.jsonl").exists()
  assert re.search(r"^captions_jsonl\s+pretrain\s+1\s+[\d.]+", out.stdout, re.M)
