"""benchmarks/pack.py: the compact copy of the real data and the float16 MiniLM checkpoint
that the real-data fine-tunes read on a machine without ../shared/data."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

import helpers

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


def test_pack_copies_the_questions_and_shrinks_the_images(tmp_path):
  helpers.shared_data()
  out = subprocess.run([sys.executable, "benchmarks/pack.py", f"--out={tmp_path / 'pack'}",
                        "--no_minilm", "--max_side=64", "--archive"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  summary = json.loads(out.stdout.strip().splitlines()[-1])
  assert set(summary["mb"]) == {"data", "minilm_slake.tar.xz"}
  packed = tmp_path / "pack" / "data"
  # Every question file the fine-tunes read (SLAKE selects its checkpoint on validate.json),
  # byte for byte.
  for name in ("vqa_rad/trainset.json", "vqa_rad/testset.json", "slake/Slake1.0/train.json",
               "slake/Slake1.0/validate.json", "slake/Slake1.0/test.json"):
    assert (packed / name).read_bytes() == (DATA / name).read_bytes(), name
  rad = sorted((packed / "vqa_rad" / "images").iterdir())
  slake = sorted((packed / "slake" / "Slake1.0" / "imgs").glob("*/source.jpg"))
  assert len(rad) == 315 and len(slake) == 642
  assert {p.name for p in rad} == {p.name for p in (DATA / "vqa_rad" / "images").iterdir()}
  for p in rad[:5] + slake[:5]:
    with Image.open(p) as img:
      assert img.format == "JPEG" and min(img.size) == 64
  assert not (tmp_path / "pack.partial").exists()
  # The archive holds SLAKE (MiniLM too, when packed) byte for byte, not VQA-RAD.
  import tarfile
  with tarfile.open(tmp_path / "pack" / "minilm_slake.tar.xz") as tar:
    archived = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
  slake_files = [p for p in (packed / "slake").rglob("*") if p.is_file()]
  assert sorted(archived) == sorted(str(p.relative_to(packed.parent)) for p in slake_files)
  assert all(archived[str(p.relative_to(packed.parent))] == p.read_bytes() for p in slake_files)
  # An earlier pack is replaced; any other folder is refused and left as it was (it was
  # replaced too, whatever it held), and so is a negative --max_side (every image 1 x 1).
  (packed / "vqa_rad" / "stale.txt").write_text("from an earlier pack")
  again = lambda out, *extra: subprocess.run(
      [sys.executable, "benchmarks/pack.py", f"--out={out}", "--no_minilm", *extra], cwd=ROOT,
      capture_output=True, text=True, timeout=600)
  out = again(tmp_path / "pack", "--max_side=64")
  assert out.returncode == 0 and not (packed / "vqa_rad" / "stale.txt").exists(), out.stderr
  mine = tmp_path / "mine"
  mine.mkdir()
  (mine / "thesis.tex").write_text("mine")
  out = again(mine)
  assert out.returncode == 2 and "holds thesis.tex, not a pack (data/, minilm/)" in out.stderr
  assert [p.name for p in mine.iterdir()] == ["thesis.tex"]
  out = again(tmp_path / "new", "--max_side=-3")
  assert out.returncode == 2 and "--max_side=-3: the shorter side" in out.stderr
  assert not (tmp_path / "new").exists()
  # A problem with the inputs is one `error: ...` line naming it, exit status 1, as the
  # README says of every command (it had no "error:").
  out = again(tmp_path / "new", f"--data={tmp_path / 'nodata'}")
  assert out.returncode == 1 and out.stderr.startswith(
      f"error: {tmp_path / 'nodata' / 'vqa_rad' / 'trainset.json'}: missing"), out.stderr


def test_the_default_side_a_zero_side_and_a_half_pack_left_behind(tmp_path, capsys):
  """On a data folder of one image per dataset: by default the images are shrunk to the side
  the usage line names (the towers' input, at which real_data.sh builds), --max_side=0 keeps
  them byte for byte, as its help says, and what a killed run left in OUT.partial does not
  end up in the next pack."""
  import re
  data = tmp_path / "data"
  questions = {"vqa_rad/trainset.json": '[{"qid": 1}]', "vqa_rad/testset.json": '[{"qid": 2}]',
               "slake/Slake1.0/train.json": '[{"qid": 3}]',
               "slake/Slake1.0/validate.json": '[{"qid": 4}]',
               "slake/Slake1.0/test.json": '[{"qid": 5}]'}
  images = {"vqa_rad/images/synpic1.jpg": (300, 400), "slake/Slake1.0/imgs/xmlab1/source.jpg":
            (420, 280)}
  for name, text in questions.items():
    (data / name).parent.mkdir(parents=True, exist_ok=True)
    (data / name).write_text(text)
  for name, size in images.items():
    (data / name).parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, (120, 60, 30)).save(data / name, quality=95)
  module = helpers.benchmark_script("pack")
  (side,) = re.findall(r"\[--max_side=(\d+)\]", module.__doc__)
  stale = tmp_path / "pack.partial" / "data" / "vqa_rad" / "images" / "from_a_killed_run.jpg"
  stale.parent.mkdir(parents=True)
  stale.write_bytes((data / "vqa_rad/images/synpic1.jpg").read_bytes())
  module.main([f"--out={tmp_path / 'pack'}", f"--data={data}", "--no_minilm"])
  packed = tmp_path / "pack" / "data"
  assert sorted(str(p.relative_to(packed)) for p in packed.rglob("*") if p.is_file()) == sorted(
      [*questions, *images])
  assert all((packed / name).read_text() == text for name, text in questions.items())
  for name, (w, h) in images.items():
    with Image.open(packed / name) as img:
      scale = int(side) / min(w, h)
      assert img.size == (round(w * scale), round(h * scale)), name
  assert not (tmp_path / "pack.partial").exists()
  module.main([f"--out={tmp_path / 'kept'}", f"--data={data}", "--no_minilm", "--max_side=0"])
  for name in images:
    assert (tmp_path / "kept" / "data" / name).read_bytes() == (data / name).read_bytes()
  capsys.readouterr()


def test_float16_minilm_loads_and_embeds_like_the_original(tmp_path, minilm_dir):
  from medvqa_jax.data.tokenizer import Tokenizer
  from medvqa_jax.models import towers
  helpers.benchmark_script("pack").pack_minilm(minilm_dir, tmp_path / "minilm")
  from safetensors.numpy import load_file
  weights = load_file(str(tmp_path / "minilm" / "model.safetensors"))
  assert {v.dtype for v in weights.values() if v.dtype.kind == "f"} == {np.dtype(np.float16)}
  batch = Tokenizer.from_folder(tmp_path / "minilm", max_len=16)(
      ["is the liver enlarged?", "what organ is shown?"])
  outs = []
  for folder in (minilm_dir, tmp_path / "minilm"):
    module, params = towers.load("text", "hf_bert", folder)
    outs.append(np.asarray(module.apply({"params": params}, batch["input_ids"],
                                        batch["attention_mask"])["pooled"]))
  scale = np.abs(outs[0]).max()
  assert np.abs(outs[1] - outs[0]).max() <= 1e-2 * scale
  assert np.abs(outs[1] - outs[0]).max() > 0  # The weights really were rounded.
