"""The host input pipeline: determinism by (seed, step), host shards, augmentations."""

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import helpers
from medvqa_jax import ASSETS
from medvqa_jax.data import augment, builders, pipeline
from medvqa_jax.data.tokenizer import Tokenizer


ANSWERS = ["Yes", "no", "The left lung."]  # As datasets write them: cased, articles, stops.


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """A built 40-question VQA dataset over 5 images: its data_dir."""
  src = tmp_path_factory.mktemp("src")
  (src / "images").mkdir()
  rng = np.random.default_rng(0)
  for i in range(5):
    Image.fromarray(rng.integers(0, 255, (48, 64, 3), np.uint8)).save(src / "images" / f"{i}.jpg")
  rows = [dict(qid=i, image_name=f"{i % 5}.jpg", question=f"is there a lesion number {i}?",
               answer=ANSWERS[i % 3], answer_type="CLOSED") for i in range(40)]
  (src / "trainset.json").write_text(json.dumps(rows))
  (src / "testset.json").write_text(json.dumps(rows[:4]))
  out = tmp_path_factory.mktemp("tfds")
  builders.build("vqa_rad", src, out)
  return out


@pytest.fixture(scope="module")
def source(built):
  return builders.load(built, "vqa_rad", "train")


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=12)


def _batches(source, tokenizer, **kw):
  args = dict(kind="vqa", tokenizer=tokenizer, image_size=32, global_batch=8, seed=1,
              augmentation="finetune", answer_vocab=["yes", "no"])
  args.update(kw)
  return pipeline.batches(source, **args)


def test_deterministic_for_seed_and_step_and_different_across_steps(source, tokenizer):
  a, b = _batches(source, tokenizer), _batches(source, tokenizer)
  for step in (0, 3, 7):  # Step 7 is in the second epoch (5 batches an epoch).
    x, y = a[step], b[step]
    assert all(np.array_equal(x[k], y[k]) for k in x)
  assert not np.array_equal(a[0]["images"], a[1]["images"])
  assert list(a[0]["id"]) != list(a[1]["id"])
  assert list(_batches(source, tokenizer, seed=2)[0]["id"]) != list(a[0]["id"])
  epoch1 = sorted(i for s in range(5) for i in a[s]["id"])
  assert epoch1 == sorted(str(i) for i in range(40))  # Each example once an epoch.
  assert [list(a[s]["id"]) for s in range(5, 10)] != [list(a[s]["id"]) for s in range(5)]


def test_host_shards_are_disjoint_and_make_the_global_batch(source, tokenizer):
  whole = _batches(source, tokenizer)
  hosts = [_batches(source, tokenizer, process_index=h, process_count=2) for h in range(2)]
  for step in (0, 4, 6):
    parts = [set(h[step]["id"]) for h in hosts]
    assert len(hosts[0][step]["id"]) == 4 and not parts[0] & parts[1]
    # Concatenated in host order, the shards are the single-host batch, augmented pixels
    # included (augmentations are seeded by global position).
    for k in whole[step]:
      joined = np.concatenate([hosts[0][step][k], hosts[1][step][k]])
      assert np.array_equal(joined, whole[step][k]), k
  with pytest.raises(ValueError, match="not divisible"):
    _batches(source, tokenizer, process_count=3)
  # One pass (repeat=False) over 36 examples: whole batches on one host, the last one short;
  # on two hosts that short batch has no split every host can batch alike: refused, rather
  # than its examples silently left out.
  from medvqa_jax.data import splits
  part = splits.Subset(source, range(36))
  assert [len(b["id"]) for b in _batches(part, tokenizer, shuffle=False, repeat=False)] == [
      8, 8, 8, 8, 4]
  with pytest.raises(ValueError, match="36 examples are not whole batches of 8: on 2 hosts"):
    _batches(part, tokenizer, shuffle=False, repeat=False, process_count=2)


def test_batch_contents(source, tokenizer):
  answer_tok = Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=6)
  batch = _batches(source, tokenizer, augmentation="test", answer_tokenizer=answer_tok,
                   shuffle=False, repeat=False)[0]
  # uint8 pixels (the tower normalises them on device), exactly the test-time resize.
  assert batch["images"].shape == (8, 32, 32, 3) and batch["images"].dtype == np.uint8
  for i in range(8):
    np.testing.assert_array_equal(batch["images"][i], augment.resize(source[i]["image"], 32))
  assert batch["input_ids"].shape == (8, 12) and batch["input_ids"].dtype == np.int32
  assert list(batch["answer"]) == [ANSWERS[int(i) % 3] for i in batch["id"]]  # The reference.
  # The label and the decoder's target are of the normalised answer ("Yes": "yes", label 0);
  # "left lung" is not in the vocabulary: label -1.
  answers = [["yes", "no", "left lung"][int(i) % 3] for i in batch["id"]]
  assert list(batch["labels"]) == [{"yes": 0, "no": 1}.get(a, -1) for a in answers]
  decoded = [tokenizer.hf.decode(ids, skip_special_tokens=True) for ids in batch["answer_ids"]]
  assert decoded == answers


def test_iterate_resumes_and_workers_give_the_same_batches(source, tokenizer):
  ds = _batches(source, tokenizer)
  with pipeline.iterate(ds, start_step=3) as it:
    assert list(next(it)["id"]) == list(ds[3]["id"])
    assert np.array_equal(next(it)["images"], ds[4]["images"])
  grain_workers = lambda: [p for p in multiprocessing.active_children() if "grain" in p.name]
  with pipeline.iterate(ds, start_step=2, num_workers=1) as workers:
    assert np.array_equal(next(workers)["images"], ds[2]["images"])
    assert len(grain_workers()) == 1
    # A scheduler's SIGTERM to every process of the job (or Ctrl-C's SIGINT to the terminal's
    # process group) is the main process's to act on: the worker keeps making batches, so
    # the step in progress can finish and be saved (it died, and the next batch failed).
    (worker,) = grain_workers()
    for sig in (signal.SIGTERM, signal.SIGINT):
      os.kill(worker.pid, sig)
    time.sleep(0.5)
    for step in range(3, 9):  # More than the batches made ahead.
      assert list(next(workers)["id"]) == list(ds[step]["id"])
    assert worker.is_alive()
  # Leaving the block stops the worker (and frees its batches in flight).
  assert grain_workers() == []


def test_workers_end_when_the_main_process_is_killed(built, tmp_path):
  """A main process killed outright (SIGKILL, the out-of-memory killer) cannot stop its input
  workers, which ignore SIGTERM: they were left running for good, holding their shared memory
  and the output pipe of the job (a `| tee` never ended). They end once their parent is
  gone."""
  script = tmp_path / "main.py"
  script.write_text(f"""
import sys, time
from medvqa_jax import ASSETS
from medvqa_jax.data import builders, pipeline
from medvqa_jax.data.tokenizer import Tokenizer
ds = pipeline.batches(builders.load({str(built)!r}, "vqa_rad", "train"), kind="vqa",
                      tokenizer=Tokenizer.from_folder(ASSETS / "bert_uncased_vocab", max_len=12),
                      image_size=32, global_batch=8, seed=1, augmentation="finetune",
                      answer_vocab=["yes", "no"])
if __name__ == "__main__":  # The workers start by importing this file.
  with pipeline.iterate(ds, num_workers=2) as it:
    next(it)
    print("ready", flush=True)
    time.sleep(600)
""")
  main = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
  try:
    import select
    assert select.select([main.stdout], [], [], 240)[0], "no batch in 240 s"
    assert main.stdout.readline().strip() == "ready"
    children = lambda pid: [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                            and _ppid(p) == pid]
    workers = [c for c in children(main.pid) if "resource_tracker" not in _cmdline(c)]
    assert len(workers) == 2, [_cmdline(c) for c in children(main.pid)]
    os.kill(workers[0], signal.SIGTERM)  # Ignored, as before.
    main.kill()
    main.wait()
    deadline = time.time() + 30
    while time.time() < deadline and any(Path(f"/proc/{w}").exists() for w in workers):
      time.sleep(0.2)
    assert not any(Path(f"/proc/{w}").exists() and _ppid(Path(f"/proc/{w}")) != 0
                   for w in workers), [_cmdline(w) for w in workers]
    assert select.select([main.stdout], [], [], 30)[0], "the output pipe is held open"
    assert main.stdout.read() == ""  # The pipe ends: no worker holds it open.
  finally:
    main.kill()


def _ppid(proc: Path) -> int:
  try:
    return int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
  except (OSError, IndexError, ValueError):
    return 0


def _cmdline(pid: int) -> str:
  try:
    return Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
  except OSError:
    return ""


def test_augmentations():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 255, (50, 70, 3), np.uint8)
  ft = augment.finetune(x, 32, np.random.default_rng(1))
  assert ft.shape == (32, 32, 3) and ft.dtype == np.uint8
  np.testing.assert_array_equal(ft, augment.finetune(x, 32, np.random.default_rng(1)))
  (v1, _), (v2, _) = (augment.pretrain(x, 32, np.random.default_rng(s)) for s in (2, 3))
  assert v1.shape == v2.shape == (32, 32, 3) and v1.dtype == np.uint8
  assert not np.array_equal(v1, v2)
  np.testing.assert_array_equal(augment.resize(x, 32), np.asarray(
      Image.fromarray(x).resize((32, 32), Image.Resampling.BICUBIC)))
  for name in augment.OPS:  # Every op runs and keeps the size.
    out = augment._OPS[name](Image.fromarray(x), 7, np.random.default_rng(4))
    assert out.size == (70, 50)


def test_benchmark_command(built):
  run = subprocess.run([sys.executable, "launch/benchmark_input.py", f"--data_dir={built}",
                        "--image_size=64", "--batch_size=4", "--batches=2", "--workers=0,1"],
                       capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
  assert run.returncode == 0, run.stderr
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert [r["workers"] for r in out["results"]] == [0, 1]
  assert all(r["images_per_s"] > 0 for r in out["results"])
  # In-process batches are timed by CPU time too (one core's figure); a worker's is its own.
  assert out["results"][0]["images_per_cpu_s"] > 0 and "images_per_cpu_s" not in out["results"][1]
  # Past the batches the workers made while starting (4 per worker: with 1 per setting, the
  # rate with workers was several times too high), over at least 4 per worker.
  assert [(r["warmup_batches"], r["timed_batches"]) for r in out["results"]] == [(1, 2), (4, 4)]
  assert (out["augmentation"], out["views"]) == ("finetune", 1)
  bad = subprocess.run([sys.executable, "launch/benchmark_input.py", f"--data_dir={built}",
                        "--workers=0,x"], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
  assert bad.returncode == 1 and "error: --workers=0,x: expected worker counts >= 0" in bad.stderr
  # --split and --augmentation choose what is timed: a split the build lacks is refused (not
  # the train split timed instead); the test augmentation is decoding and resizing alone.
  bad = subprocess.run([sys.executable, "launch/benchmark_input.py", f"--data_dir={built}",
                        "--split=validation"], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
  assert bad.returncode == 1 and bad.stderr.startswith(
      "error: vqa_rad has no split 'validation'; it has ['test', 'train']"), bad.stderr[-2000:]
  run = subprocess.run([sys.executable, "launch/benchmark_input.py", f"--data_dir={built}",
                        "--split=test", "--augmentation=test", "--image_size=64",
                        "--batch_size=4", "--batches=1", "--workers=0"],
                       capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
  assert run.returncode == 0, run.stderr
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert (out["split"], out["augmentation"]) == ("test", "test")


# Runs a launch script with its own timer (time.perf_counter, called from the script's file)
# reading 0, 10, 20, ... seconds: each interval it times is 10 s. Other callers get the clock.
_TEN_SECOND_TIMER = """
import runpy, sys, time
sys.argv = sys.argv[1:]
clock, ticks = time.perf_counter, iter(range(0, 10**6, 10))
time.perf_counter = lambda: (float(next(ticks)) if sys._getframe(1).f_code.co_filename
                             .endswith(sys.argv[0]) else clock())
sys.path.insert(0, "launch")
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def test_benchmark_command_times_the_pretraining_pipeline(tmp_path):
  """A caption corpus gives the pre-training batches (two augmented views per example), with
  the pre-training augmentation unless told otherwise. The rates are the images of the timed
  batches (both views) over the seconds they took: in total, and per worker."""
  corpus = tmp_path / "corpus"
  corpus.mkdir()
  helpers.write_jsonl(corpus / "train.jsonl", helpers.sample_caption_rows())
  run = subprocess.run([sys.executable, "-c", _TEN_SECOND_TIMER, "launch/benchmark_input.py",
                        f"--data_dir={tmp_path / 'tfds'}", "--dataset=captions_jsonl",
                        f"--source_dir={corpus}", "--image_size=64",
                        "--batch_size=4", "--batches=2", "--workers=0,2"],
                       capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).resolve().parents[2])
  assert run.returncode == 0, run.stderr
  out = json.loads(run.stdout.strip().splitlines()[-1])
  assert (out["dataset"], out["augmentation"], out["views"]) == ("captions_jsonl", "pretrain", 2)
  assert [(r["workers"], r["timed_batches"]) for r in out["results"]] == [(0, 2), (2, 8)]
  for r, per_worker in zip(out["results"], (1, 2)):
    rate = r["timed_batches"] * 4 * 2 / 10  # Batches x 4 examples x 2 views, in 10 s.
    assert r["images_per_s"] == pytest.approx(rate, abs=0.05), out
    assert r["images_per_s_per_worker"] == pytest.approx(rate / per_worker, abs=0.05), out


def test_pretraining_views_carry_their_blur_for_the_device(source, tokenizer):
  rng = np.random.default_rng(0)
  captions = [{"id": str(i), "image": rng.integers(0, 255, (40, 48, 3), np.uint8),
               "image_id": f"{i // 2:020x}", "caption": f"a chest film number {i}"}
              for i in range(16)]
  ds = _batches(captions, tokenizer, kind="caption", augmentation="pretrain", global_batch=16,
                answer_vocab=None)
  batch = ds[0]
  # The pictures' keys (for the ITM negatives), equal for two captions of one picture.
  keys = {int(k): int(i) // 2 for k, i in zip(batch["image_key"], batch["id"])}
  assert batch["image_key"].dtype == np.uint32 and len(keys) == 8
  assert len(set(keys.values())) == 8
  for key in ("blur", "blur2"):
    sigma = batch[key]
    assert sigma.shape == (16,) and sigma.dtype == np.float32
    drawn = sigma[sigma > 0]
    assert 0 < len(drawn) < 16 and drawn.min() >= augment.BLUR_SIGMA[0]
    assert drawn.max() <= augment.BLUR_SIGMA[1]
  assert not np.array_equal(batch["blur"], batch["blur2"])  # Drawn per view.
  np.testing.assert_array_equal(batch["blur2"], ds[0]["blur2"])  # A function of the position.
  assert "blur" not in _batches(source, tokenizer)[0]  # Fine-tuning draws no blur.


def test_a_multi_view_example_gives_each_view_its_own_image(tokenizer):
  """A corpus with two pictures per example (frontal and lateral films): the second view, and
  the online teacher's second picture, are made from `image2`, not from the first image."""
  rng = np.random.default_rng(3)
  first, second = (rng.integers(0, 255, (40, 48, 3), np.uint8) for _ in range(2))
  example = {"id": "0", "image": first, "image2": second, "image_id": "0" * 20,
             "caption": "a frontal and a lateral chest film"}
  out = pipeline._Example("caption", tokenizer, 16, "test", teacher=(tokenizer, 8))(example)
  np.testing.assert_array_equal(out["images"], augment.resize(first, 16))
  np.testing.assert_array_equal(out["images2"], augment.resize(second, 16))
  np.testing.assert_array_equal(out["teacher_pixels"], augment.resize(first, 8))
  np.testing.assert_array_equal(out["teacher_pixels2"], augment.resize(second, 8))
  # One picture: both views are made from it (each augmented on its own in pre-training).
  one = pipeline._Example("caption", tokenizer, 16, "test")(
      {k: v for k, v in example.items() if k != "image2"})
  np.testing.assert_array_equal(one["images2"], augment.resize(first, 16))


def test_one_pass_on_several_hosts_reads_every_example_once(source, tokenizer):
  """repeat=False (pre-training's validation) on 2 and 4 hosts: each host's batches, joined
  in host order step by step, are the single host's pass (40 examples, 5 batches of 8)."""
  whole = _batches(source, tokenizer, shuffle=False, repeat=False)
  assert len(whole) == 5
  for hosts in (2, 4):
    parts = [_batches(source, tokenizer, shuffle=False, repeat=False, process_index=h,
                      process_count=hosts) for h in range(hosts)]
    assert [len(p) for p in parts] == [5] * hosts
    for step in range(5):
      assert list(np.concatenate([p[step]["id"] for p in parts])) == list(whole[step]["id"])
