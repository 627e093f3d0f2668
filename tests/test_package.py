"""The package as a user meets it: imports, torch-free paths, configs, commands, README."""

import json
import logging
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from helpers import HIDE_TORCH

ROOT = Path(__file__).resolve().parents[1]

def _python(code, timeout=300):
  return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        timeout=timeout, cwd=ROOT)


def test_import_does_not_import_torch():
  out = _python("import sys, medvqa_jax, medvqa_jax.models.towers, medvqa_jax.data.tokenizer, "
                "medvqa_jax.data.image\nprint('torch' in sys.modules)")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "False"


def test_towers_and_tokenizer_work_without_torch(minilm_dir):
  code = HIDE_TORCH + textwrap.dedent(f"""
      from medvqa_jax.data.tokenizer import Tokenizer
      from medvqa_jax.models import towers
      module, params = towers.load("text", "hf_bert", {str(minilm_dir)!r})
      batch = Tokenizer.from_folder({str(minilm_dir)!r}, max_len=16)(["is the liver enlarged?"])
      out = module.apply({{"params": params}}, batch["input_ids"], batch["attention_mask"])
      print(out["tokens"].shape, "torch" in sys.modules)
      """)
  out = _python(code)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().endswith("(1, 16, 384) False")


def _run(*args):
  return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                        cwd=ROOT)


def _run_after(prelude: str, script: str, *args):
  """`python SCRIPT ARGS...` with `prelude` run first in its process (e.g. HIDE_TORCH)."""
  return _python(prelude + textwrap.dedent(f"""
      import runpy, sys
      sys.path.insert(0, "launch")  # As `python launch/X.py` puts its folder first.
      sys.argv = {[script, *args]!r}
      runpy.run_path({script!r}, run_name="__main__")
      """))


def test_embed_command_on_the_embedded_default():
  out = _run("launch/embed.py", "--config=configs/demo.py")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["image_tokens"] == [4, 65, 64] and result["question_tokens"] == [8, 24, 64]
  sim = np.asarray(result["cosine_image_x_question"])
  assert sim.shape == (4, 8) and np.all(np.abs(sim) <= 1 + 1e-6)
  # The towers run as model.compute says (it was not read: any value passed).
  bogus = _run("launch/embed.py", "--config=configs/demo.py",
               "--config.model.compute.attention=bogus")
  assert bogus.returncode != 0 and "unknown attention 'bogus'" in bogus.stderr, bogus.stderr
  # Its towers are compiled with the config's compiler options (train.deterministic's GPU
  # kernels): options XLA refuses, asked for on this CPU, stand in for them.
  refusing = ("from medvqa_jax.train import determinism\n"
              "determinism.GPU_PLATFORMS = ('cpu',)\n"
              "determinism.GPU_OPTIONS = {'xla_gpu_no_such_option_here': True}\n")
  asked = _run_after(refusing, "launch/embed.py", "--config=configs/demo.py",
                     "--config.train.deterministic=True")
  assert asked.returncode == 1 and "No such compile option" in asked.stderr, asked.stderr
  assert _run_after(refusing, "launch/embed.py", "--config=configs/demo.py").returncode == 0


def test_commands_run_without_torch_and_do_not_say_it_is_missing(monkeypatch):
  """The main job's install has no torch. transformers, imported for its tokenizers, then
  advised at import that "Models won't be available", among the first lines of the main
  command's output, though no command uses its models: the commands leave that out."""
  # Set in this process by tests that import launch/common.py: the command must set it.
  monkeypatch.delenv("TRANSFORMERS_NO_ADVISORY_WARNINGS", raising=False)
  bare = _python(HIDE_TORCH + "import transformers")
  assert bare.returncode == 0 and "PyTorch was not found" in bare.stderr  # What it says.
  out = _run_after(HIDE_TORCH + "import atexit\natexit.register(lambda: print('torch' in "
                   "sys.modules))\n", "launch/embed.py", "--config=configs/demo.py")
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip().endswith("False")
  assert json.loads(out.stdout.strip().splitlines()[-2])["image_tokens"] == [4, 65, 64]
  assert "PyTorch" not in out.stderr, out.stderr


def test_embed_command_with_a_checkpoint_override(minilm_dir, tmp_path):
  """Questions are read as training reads them: two spellings of one question embed alike."""
  out = _run("launch/embed.py", "--config=configs/base.py:image=tiny,text=minilm",
             f"--config.model.text.checkpoint={minilm_dir}", "--config.model.text.max_len=12",
             "--question=is the heart enlarged?", "--question=no")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["question_tokens"] == [2, 12, 384] and "image_tokens" not in result
  from medvqa_jax import ASSETS
  image = sorted((ASSETS / "demo" / "images").iterdir())[0]
  questions = ["Is this an X-ray of the chest?", "is this an xray of the chest",
               "is this a ct of the chest"]
  out = _run("launch/embed.py", "--config=configs/demo.py", f"--image={image}",
             *[f"--question={q}" for q in questions], "--config.seed=7")
  assert out.returncode == 0, out.stderr
  (sim,) = json.loads(out.stdout.strip().splitlines()[-1])["cosine_image_x_question"]
  assert sim[0] == sim[1] != sim[2]
  # Both towers are initialised from --config.seed: the similarities are those of the towers
  # made here with that seed.
  import jax
  from configs import demo
  from medvqa_jax.data import augment, builders
  from medvqa_jax.data import text as text_lib
  from medvqa_jax.data import tokenizer as tokenizer_lib
  from medvqa_jax.models import towers
  config = demo.get_config()
  (img, img_params), (txt, txt_params) = (towers.from_config(config.model[k], seed=7)
                                          for k in ("image", "text"))
  pixels = augment.resize(np.asarray(builders.read_as_built(image, config.data.get("max_side"))),
                          img.image_size)
  batch = tokenizer_lib.from_config(config.model.text)([text_lib.question(q) for q in questions])
  v = jax.jit(img.apply)({"params": img_params}, pixels[None])
  t = jax.jit(txt.apply)({"params": txt_params}, batch["input_ids"], batch["attention_mask"])
  unit = lambda out: (lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True))(
      np.asarray(out["embedding" if "embedding" in out else "pooled"]))
  np.testing.assert_allclose(sim, unit(v)[0] @ unit(t).T, atol=2e-4)
  # A picture that is not square is read as evaluation reads it, whole, resized to a square:
  # nearly the features of that square (both stored as a build stores them, as JPEG), not
  # those of its centre crop (a crop once cut its sides).
  from PIL import Image
  size = demo.get_config().model.image.arch.image_size
  wide = np.random.default_rng(0).integers(0, 256, (size, 2 * size, 3), np.uint8)
  wide[:, :size // 2] = 255  # Sides a crop would drop.
  # JPEGs, which a build keeps byte for byte: the square one holds the wide one's pixels as
  # decoded and resized, up to quality 100's rounding.
  Image.fromarray(wide).save(tmp_path / "wide.jpg", quality=95)
  decoded = np.asarray(Image.open(tmp_path / "wide.jpg").convert("RGB"))
  Image.fromarray(augment.resize(decoded, size)).save(tmp_path / "square.jpg", quality=100,
                                                      subsampling=0)
  Image.fromarray(decoded[:, size // 2:size // 2 + size]).save(tmp_path / "crop.jpg",
                                                               quality=100, subsampling=0)
  out = _run("launch/embed.py", "--config=configs/demo.py", f"--image={tmp_path / 'wide.jpg'}",
             f"--image={tmp_path / 'square.jpg'}", f"--image={tmp_path / 'crop.jpg'}",
             "--question=is this a ct of the chest")
  assert out.returncode == 0, out.stderr
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert [Path(p).name for p in result["images"]] == ["wide.jpg", "square.jpg", "crop.jpg"]
  (wide_sim,), (square_sim,), (crop_sim,) = result["cosine_image_x_question"]
  assert abs(wide_sim - square_sim) <= 2e-3 < 0.02 < abs(wide_sim - crop_sim), result
  empty = _run("launch/embed.py", "--config=configs/demo.py", "--question=?")
  assert empty.returncode != 0 and "--question '?' is empty" in empty.stderr
  # A run's towers are embedded with its own config: a --config beside it is refused, as is a
  # --step without a run (each before anything is read).
  for flags in (["--config=configs/demo.py"], ["--config.seed=3"]):
    both = _run("launch/embed.py", f"--checkpoint_dir={tmp_path}", *flags)
    assert both.returncode != 0 and "give no --config or --config.FIELD" in both.stderr, flags
  alone = _run("launch/embed.py", "--step=3")
  assert alone.returncode != 0 and "give the run with --checkpoint_dir" in alone.stderr


def test_unset_checkpoint_names_the_flag():
  out = _run("launch/embed.py", "--config=configs/base.py:image=clip_vit_b16,text=tiny")
  assert out.returncode != 0
  assert "no folder is set: pass --config.model.image.checkpoint=" in out.stderr
  out = _run("launch/embed.py", "--config=configs/base.py:image=tiny,text=tiny",
             "--config.model.text.tokenizer=")
  assert out.returncode != 0
  assert "set --config.model.text.tokenizer=/path (or --config.model.text.checkpoint" in out.stderr


def test_train_names_the_missing_setting(tmp_path):
  # Every setting the config leaves unset, in one message.
  out = _run("launch/train.py", "--config=configs/slake.py")
  assert out.returncode == 1 and out.stderr.startswith(
      "error: the config leaves unset what the run needs: set --config.train.workdir="), out.stderr
  for flag in ("data.dir", "model.image.checkpoint", "model.text.checkpoint"):
    assert f"; --config.{flag}=" in out.stderr.splitlines()[0], flag
  # Then what is missing on disk (the checkpoints are read after the data).
  out = _run("launch/train.py", "--config=configs/slake.py", f"--config.train.workdir={tmp_path}",
             f"--config.data.dir={tmp_path}", f"--config.model.image.checkpoint={tmp_path}/i",
             f"--config.model.text.checkpoint={tmp_path}/t")
  assert out.returncode != 0 and "prepare_data.py --dataset=slake" in out.stderr
  assert not any(tmp_path.iterdir())  # Nothing written by a run that could not start.
  bad = _run("launch/train.py", "--config=configs/demo.py", "--config.model.image.arch.dept=3")
  assert bad.returncode != 0  # Configs are locked: a typo is an error.
  # The demo's towers are fixed: tower presets given to it are refused, not ignored.
  arg = _run("launch/count_params.py", "--config=configs/demo.py:image=paper_init")
  assert arg.returncode == 2 and "configs/demo.py takes no argument" in arg.stderr


def test_eval_and_predict_say_what_is_missing(tmp_path):
  """A missing checkpoint (a FileNotFoundError of the project's own, as a bad config value's
  ValueError) is reported as its message and where it was raised, exit status 1, without a
  traceback."""
  out = _run("launch/eval.py", f"--checkpoint_dir={tmp_path / 'nothing'}")
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.startswith(f"error: no checkpoint at {tmp_path / 'nothing'}: no such "
                               "folder\n(raised at ")
  out = _run("launch/eval.py", f"--checkpoint_dir={ROOT / 'README.md'}")
  assert out.stderr.startswith(f"error: no checkpoint at {ROOT / 'README.md'}: a file, not a "
                               "run's folder\n(raised at "), out.stderr
  # An --out that is a file: refused before restoring (a FileExistsError after evaluating).
  (tmp_path / "notes.txt").write_text("mine")
  out = _run("launch/eval.py", f"--checkpoint_dir={tmp_path / 'nothing'}",
             f"--out={tmp_path / 'notes.txt'}")
  assert out.returncode == 1 and f"--out={tmp_path / 'notes.txt'}: is a file" in out.stderr
  assert (tmp_path / "notes.txt").read_text() == "mine"
  out = _run("launch/predict.py", f"--checkpoint_dir={tmp_path}", "--image=x.jpg", "--question=q")
  assert out.returncode != 0 and "--image=x.jpg: image file not found" in out.stderr  # Before
  # restoring, as a file that is not an image (it was read after the model was restored).
  for image, why in ((tmp_path, "a folder, not an image file"),
                     (ROOT / "README.md", "unreadable image (not an image format PIL can read)")):
    for command in ("predict.py", "embed.py"):
      out = _run(f"launch/{command}", f"--checkpoint_dir={tmp_path}", f"--image={image}",
                 "--question=q")
      assert out.returncode == 1 and f"--image={image}: {why}" in out.stderr, out.stderr
  from medvqa_jax import ASSETS
  image = sorted((ASSETS / "demo" / "images").iterdir())[0]
  out = _run("launch/predict.py", f"--checkpoint_dir={tmp_path}", f"--image={image}",
             "--question=q")
  # A folder without checkpoints, the same error as eval.py's (evaluate.run.restore).
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.startswith(f"error: no complete checkpoint in {tmp_path} (expected a run's "
                               "folder, its checkpoints/ folder or one step's folder)\n(raised at ")
  # A picture's folder that cannot be written: refused before restoring, not after answering
  # (the tests run as root, who may write anywhere: os.access says no for that folder).
  shut = tmp_path / "shut"
  shut.mkdir()
  out = _run_after(textwrap.dedent(f"""
      import os
      real = os.access
      os.access = lambda p, mode, *a, **k: (not (mode & os.W_OK and str(p) == {str(shut)!r})
                                            and real(p, mode, *a, **k))
      """), "launch/predict.py", f"--checkpoint_dir={tmp_path}", f"--image={image}",
                   "--question=q", f"--out={shut / 'a.png'}")
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.startswith(f"error: --out={shut / 'a.png'}: {shut} cannot be written: "
                               "name a picture elsewhere"), out.stderr


def test_a_pytorch_checkpoint_without_torch_is_one_error_line(hf_bert_pretraining):
  """The main job's install has no torch, and Bio_ClinicalBERT, the paper's text tower, comes
  as a pytorch_model.bin: the command's refusal, which says what to do, came under a
  traceback. A failed import of a missing module keeps its traceback."""
  folder = hf_bert_pretraining[1]
  out = _run_after(HIDE_TORCH, "launch/embed.py", "--config=configs/base.py:image=tiny,text=minilm",
                   f"--config.model.text.checkpoint={folder}")
  assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.startswith(f"error: {folder / 'pytorch_model.bin'} is a PyTorch pickle and "
                               "reading it needs torch, which is not installed."), out.stderr
  assert "(raised at medvqa_jax/models/state_dict.py:" in out.stderr
  # A failed import in the project's code (pypng, which 16-bit colour PNGs need) is not one.
  sys.path.insert(0, str(ROOT / "launch"))
  try:
    import common
  finally:
    sys.path.remove(str(ROOT / "launch"))
  import io

  import png
  from PIL import Image

  from medvqa_jax.data import image as image_lib
  deep = io.BytesIO()
  png.Writer(2, 2, greyscale=False, bitdepth=16).write(deep, [[0] * 6, [65535] * 6])
  saved, sys.modules["png"] = sys.modules["png"], None
  try:
    image_lib.full_depth(Image.open(io.BytesIO(deep.getvalue())), deep.getvalue())
  except ImportError as e:
    assert e.name == "png" and common._own_error(e) is None
  else:
    raise AssertionError("no ImportError")
  finally:
    sys.modules["png"] = saved


def test_readme_example_runs(hf_clip, minilm_dir):
  """The README's Python example, with its checkpoint folders pointed at a tiny CLIPModel
  and the real MiniLM (the output sizes change accordingly)."""
  from medvqa_jax import ASSETS
  readme = (ROOT / "README.md").read_text()
  code = re.search(r"```python\n(.*?)```", readme, re.S).group(1)
  assert '"/ckpt/clip-vit-base-patch16"' in code and '"/ckpt/Bio_ClinicalBERT"' in code
  code = (code.replace('"/ckpt/clip-vit-base-patch16"', repr(str(hf_clip[1])))
          .replace('"/ckpt/Bio_ClinicalBERT"', repr(str(minilm_dir)))
          .replace("image_size=288, depth=11", "image_size=48, depth=2")
          .replace('"scan.jpg"', repr(str(ASSETS / "demo" / "images" / "synpic54610.jpg"))))
  out = _python(code)
  assert out.returncode == 0, out.stderr
  assert out.stdout.strip() == "(1, 37, 64) (1, 30, 384)"


class TestConfigs:

  @pytest.fixture(autouse=True)
  def _configs(self):
    from configs import base, demo
    self.base, self.demo = base, demo

  def test_paper_defaults(self):
    config = self.base.get_config()
    assert config.model.image.source == "hf_clip"
    assert (config.model.image.arch.image_size, config.model.image.arch.depth) == (288, 11)
    assert config.model.text.source == "hf_bert" and config.model.text.max_len == 30
    assert config.teacher.image.source == "open_clip" and config.teacher.text.kind == "bert"
    assert config.model.image.checkpoint is None  # The user names the folder.
    with pytest.raises(AttributeError):
      config.model.image.arch.dept = 3  # Locked.

  @pytest.mark.parametrize("name", ["clip_vit_b16", "biomedclip", "bio_clinicalbert",
                                    "minilm", "tiny", "paper_init", "vit_s16_scratch"])
  def test_every_preset_is_selectable(self, name):
    parts = self.base.preset(name)
    arg = ",".join(f"{p}={name}" for p in ("image", "text") if p in parts)
    config = self.base.get_config(arg)
    for part in parts:
      assert config.model[part].kind == parts[part].kind

  def test_towers_only_is_the_plain_clip_step(self):
    from configs import towers_only
    config = towers_only.get_config()
    mc = config.model
    assert (mc.image.arch.image_size, mc.image.arch.depth, mc.image.arch.width) == (224, 12, 768)
    assert (mc.text.kind, mc.text.arch.depth, mc.text.arch.width, mc.text.max_len) == (
        "clip_text", 12, 512, 77)
    assert mc.fusion.layers == 0 and mc.head == "none" and config.teacher.mode == "none"
    assert {k for k, v in config.losses.weights.items() if v} == {"itgc"}
    assert config.losses.label_smoothing == 0.0  # CLIP's InfoNCE, not the reference's.
    assert mc.dtype == "bfloat16" and config.train.batch_size == 256
    with pytest.raises(ValueError, match="no argument or 'tiny'"):
      towers_only.get_config("huge")

  @pytest.mark.parametrize("module", ["towers_only", "pretrain_stage1", "vqa_rad", "slake",
                                      "pathvqa", "demo"])
  def test_configs_pick_cudnn_on_a_hopper_gpu_and_the_reference_elsewhere(self, monkeypatch,
                                                                          module):
    """attention="auto" by default: on a GPU (faked: its backend name and compute
    capability 9.0), the bf16 towers of the paper-size configs use cuDNN's kernel; on this
    CPU every config keeps the reference einsums."""
    import importlib

    import jax
    import jax.numpy as jnp

    from medvqa_jax.models import amif
    config = importlib.import_module(f"configs.{module}").get_config()
    compute = amif.compute_of(config)
    assert compute.attention == "auto"
    image = config.model.image.arch
    dims = [image.width // image.num_heads] if "width" in image else [None]
    assert compute.kernel(jnp.bfloat16, dims[0]) == "reference"  # This CPU.
    device = type("Device", (), {"compute_capability": "9.0"})()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    assert compute.kernel(jnp.bfloat16, dims[0]) == "cudnn"
    assert compute.kernel(jnp.float32, dims[0]) == "reference"

  def test_fusion_losses_need_fusion_layers(self):
    import numpy as np

    from configs import towers_only
    from medvqa_jax.losses.pretrain import pretrain_loss
    from medvqa_jax.models import amif
    config = towers_only.get_config("tiny")
    model, params = amif.create(config)
    assert "fusion" not in params and "itm_head" not in params
    config.losses.weights.itm = 1.0
    batch = {"images": np.zeros((2, 64, 64, 3), np.float32),
             "input_ids": np.ones((2, 32), np.int32), "attention_mask": np.ones((2, 32), np.int32)}
    with pytest.raises(ValueError, match="no fusion layers"):
      pretrain_loss(model, params, batch, None, config.losses)

  def test_bad_arguments(self):
    with pytest.raises(ValueError, match="no tower preset 'vit_h14'"):
      self.base.get_config("image=vit_h14")
    # A module of that folder that is no preset (configs/towers/common.py holds helpers).
    with pytest.raises(ValueError, match=r"no tower preset 'common' in configs/towers/ "
                       r"\(presets: bio_clinicalbert, biomedclip, clip_vit_b16, minilm, "):
      self.base.get_config("image=common")
    with pytest.raises(ValueError, match="expected one of"):
      self.base.get_config("vision=tiny")
    with pytest.raises(ValueError, match="has no image tower"):
      self.base.get_config("image=minilm")

  def test_a_preset_that_fails_to_import_says_why(self, tmp_path, monkeypatch):
    """A preset whose own import failed (a misspelt module) was reported as no such preset,
    the list naming it."""
    import configs.towers
    (tmp_path / "broken_preset.py").write_text(
        "from configs.towers.commn import tower\n\ndef get_config():\n  return None\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(configs.towers, "__path__", [*configs.towers.__path__, str(tmp_path)])
    with pytest.raises(ModuleNotFoundError, match="No module named 'configs.towers.commn'"):
      self.base.get_config("text=broken_preset")

  @pytest.mark.parametrize("name", ["vqa_rad", "slake", "pathvqa", "vqa_med_2019"])
  def test_finetuning_configs_have_the_reference_hyperparameters(self, name):
    import importlib
    config = importlib.import_module(f"configs.{name}").get_config()
    assert config.data.name == name and config.model.head == "generative"
    o = config.optim
    assert (o.lr, o.weight_decay, o.b1, o.b2, o.warmup_fraction) == (1.5e-5, 0.05, 0.9, 0.98, 0.4)
    assert config.train.batch_size == 48  # The reference's 24 per GPU on 2 GPUs.
    assert config.model.image.arch.image_size == 288 and config.model.text.max_len == 30
    assert config.data.val_split == ("" if name == "vqa_rad" else "validation")
    assert config.data.dir is None and config.train.workdir is None  # The user names them.

  # (config, argument, field, value, where the value is stated). A researcher reads these
  # values in DESIGN.md (../shared/DESIGN.md), README.md or the config's own docstring or
  # comment; a config that drifted from them would run another experiment, silently.
  STATED = [
      # DESIGN.md "Model" 4: 6 two-stream co-attention layers, BERT style on the 768-d
      # projections (3: Linear(768,768)): BERT-base's 12 heads and 3072-wide FFN.
      ("base", None, "model.fusion", dict(layers=6, width=768, heads=12, mlp_dim=3072)),
      # DESIGN.md "Pre-training objectives": itgc, imvc, utgc; wpa weight 3; itm; lambda 0.01.
      ("base", None, "losses.weights", dict(itgc=1.0, imvc=1.0, utgc=1.0, wpa=3.0, itm=1.0)),
      ("base", None, "losses.lam", 0.01),
      # DESIGN.md "Model" 6: top-k=32 candidates re-scored by full likelihood.
      ("base", None, "model.rank_k", 32),
      # base.py's comment: hard-label InfoNCE smoothed as the reference does (towers_only's
      # plain CLIP step sets 0.0, "not the reference's").
      ("base", None, "losses.label_smoothing", 0.1),
      # README.md: VQA-RAD validates on "a seeded 10% of the training images".
      ("base", None, "data.val_fraction", 0.1),
      # DESIGN.md "Stages" / the config's docstring: stage 0 trains the global losses only,
      # fusion is not run (no wpa, no itm); stage 1 adds OT (weight 3) and ITM.
      ("pretrain_stage0", None, "losses.weights",
       dict(itgc=1.0, imvc=1.0, utgc=1.0, wpa=0.0, itm=0.0)),
      ("pretrain_stage1", None, "losses.weights",
       dict(itgc=1.0, imvc=1.0, utgc=1.0, wpa=3.0, itm=1.0)),
      # README.md's configs table: 50 / 30 / 20 / 20 epochs.
      ("vqa_rad", None, "train.epochs", 50),
      ("slake", None, "train.epochs", 30),
      ("pathvqa", None, "train.epochs", 20),
      ("vqa_med_2019", None, "train.epochs", 20),
      # README.md: 16,384 and 8,192 word pieces in the PathVQA and VQA-Med-2019 configs.
      ("pathvqa", None, "model.prior_max_tokens", 16384),
      ("vqa_med_2019", None, "model.prior_max_tokens", 8192),
      ("vqa_rad", None, "model.prior_max_tokens", 1024),
      # base.py's optim comment: the 40% warm-up is "4,000 of its 10,000 steps"; README.md's
      # configs table: global batch 256, validated on a held-out 2% of the corpus.
      *[(stage, None, field, value) for stage in ("pretrain_stage0", "pretrain_stage1")
        for field, value in (("optim.total_steps", 10000), ("train.batch_size", 256),
                             ("data.val_fraction", 0.02))],
      # README.md's configs table and finetune.py / pretrain_common.py's docstrings: bf16
      # compute for the towers and everything above them (configs/towers/common.py bf16).
      ("vqa_rad", None, "model.image.dtype", "bfloat16"),
      ("vqa_rad", None, "model.text.dtype", "bfloat16"),
      ("vqa_rad", None, "model.dtype", "bfloat16"),
      ("pretrain_stage0", None, "model.image.dtype", "bfloat16"),
      ("pretrain_stage0", None, "model.text.dtype", "bfloat16"),
      ("pretrain_stage1", "image=vit_s16_scratch,text=minilm", "model.text.dtype", "bfloat16"),
      ("pretrain_stage1", "image=vit_s16_scratch,text=minilm", "model.image.dtype",
       "bfloat16"),
      # README.md's presets table and the preset's docstring: 6 blocks of 6 heads, width 384,
      # 224 px (ViT-S/16: width 384, 6 heads).
      ("base", "image=vit_s16_scratch", "model.image.arch",
       dict(depth=6, num_heads=6, width=384, image_size=224, patch_size=16)),
      # paper_init's text tower has Bio_ClinicalBERT's shape: its (BERT-base cased)
      # vocabulary of 28,996 word pieces, BERT-base's 12 layers of 768.
      ("base", "text=paper_init", "model.text.arch",
       dict(vocab_size=28996, depth=12, width=768, num_heads=12, max_positions=512)),
      ("base", "image=paper_init", "model.image.arch",
       dict(image_size=288, depth=11, width=768, num_heads=12, patch_size=16)),
  ]

  def test_configs_hold_the_values_the_documents_state(self):
    import importlib
    for module, arg, field, value in self.STATED:
      got = importlib.import_module(f"configs.{module}").get_config(arg)
      for key in field.split("."):
        got = got[key]
      if isinstance(value, dict):
        got = {k: got[k] for k in value}
      assert got == value, (module, arg, field)

  @pytest.mark.parametrize("stage", [0, 1])
  def test_pretraining_configs(self, stage):
    import importlib
    config = importlib.import_module(f"configs.pretrain_stage{stage}").get_config()
    assert config.model.head == "none" and config.model.text.max_len == 120
    assert config.teacher.text.max_len is None  # The student's (teacher.from_config).
    assert (config.optim.weight_decay, config.optim.b2) == (0.02, 0.98)
    assert config.teacher.mode == "cache"
    # The tiny towers (64 positions) smoke-test the stage as they are: captions cut to 64.
    from medvqa_jax.data.tokenizer import from_config
    from medvqa_jax.models import amif
    tiny = importlib.import_module(f"configs.pretrain_stage{stage}").get_config(
        "image=tiny,text=tiny,teacher=tiny")
    assert tiny.model.text.max_len == 64
    # CLIP's text tower reads 77 tokens, as student (was 120: refused when the model was
    # built); as teacher, see test_the_teacher_reads_what_the_student_reads.
    clip = importlib.import_module(f"configs.pretrain_stage{stage}").get_config(
        "image=clip_vit_b16,text=clip_vit_b16,teacher=clip_vit_b16")
    assert clip.model.text.max_len == 77
    # The student's CLIP is cut (11 blocks, 288 px); the teacher is CLIP whole, at its own
    # size (it took the student's cut).
    assert (clip.model.image.arch.depth, clip.model.image.arch.image_size) == (11, 288)
    assert (clip.teacher.image.arch.depth, clip.teacher.image.arch.image_size) == (None, None)
    amif.create(tiny, abstract=True)  # Was: sequence length 120 exceeds max_positions 64.
    assert from_config(tiny.model.text).vocab_size == 30522  # The bundled vocabulary.
    # A random teacher has no checkpoint scale: CLIP's initial one (was an error asking for
    # --config.teacher.logit_scale).
    from medvqa_jax.losses import teacher as teacher_lib
    assert teacher_lib.from_config(tiny).logit_scale == pytest.approx(1 / 0.07)

  def test_a_clip_teacher_is_the_checkpoint_whole(self, hf_clip):
    """The teacher preset clip_vit_b16 loads the whole CLIP at its own size: with the
    student's cut it kept 11 blocks (here: refused, the checkpoint has 3) at 288 px."""
    from medvqa_jax.models import towers
    _, folder = hf_clip
    config = self.base.get_config("image=clip_vit_b16,text=clip_vit_b16,teacher=clip_vit_b16")
    config.teacher.image.checkpoint = str(folder)
    module, _ = towers.from_config(config.teacher.image, where="teacher.image")
    assert (module.depth, module.image_size) == (3, 32)  # The checkpoint's own.

  def test_demo_config_builds_its_towers(self):
    from medvqa_jax.data.tokenizer import from_config
    from medvqa_jax.models import towers
    config = self.demo.get_config()
    for part in ("image", "text"):
      module, params = towers.from_config(config.model[part])
      assert params  # Randomly initialised from `arch`.
    assert from_config(config.model.text).vocab_size == 30522


@pytest.mark.parametrize("name", ["base", "demo", "vqa_rad", "slake", "pathvqa",
                                  "vqa_med_2019", "pretrain_stage0", "pretrain_stage1",
                                  "towers_only"])
def test_every_config_field_can_be_set_from_the_command_line(name):
  """A field holding a bare None cannot be set by --config.FIELD (ml_collections: "Type
  NoneType ... is not supported for overriding", exit status 2): the demo's data.max_side and
  a checkpoint teacher's image_size were such. An unset field is a typed placeholder."""
  import importlib

  from ml_collections import ConfigDict

  def bare(config, prefix=""):
    for key in config.keys():
      raw = config._fields[key]
      if isinstance(raw, ConfigDict):
        yield from bare(raw, f"{prefix}{key}.")
      elif raw is None:
        yield prefix + key

  assert list(bare(importlib.import_module(f"configs.{name}").get_config())) == []
  if name == "demo":
    out = _run("launch/count_params.py", "--config=configs/demo.py",
               "--config.data.max_side=96", "--config.teacher.image.arch.image_size=64")
    assert out.returncode == 0, out.stderr


def test_a_config_field_typo_is_named_with_the_nearest_fields():
  out = _run("launch/count_params.py", "--config=configs/demo.py",
             "--config.train.total_step=4", "--config.optim.total_steps=3")
  assert out.returncode == 2
  assert out.stderr.startswith("error: --config.train.total_step: the config has no such "
                               "field (did you mean --config.optim.total_steps")
  # One line: ml_collections' error, its newline escaped ('\'total_step\'\nDid you mean'),
  # followed it.
  assert "Traceback" not in out.stderr and len(out.stderr.splitlines()) == 1, out.stderr
  assert _run("launch/count_params.py", "--config=configs/demo.py",
              "--config.optim.total_steps=3").returncode == 0
  # Under the script's default config too (ml_collections reads that as the flag is defined:
  # the misspelt parent field was a KeyError traceback from the import).
  out = _run("launch/count_params.py", "--config.model.fusoin.width=64")
  assert out.returncode == 2 and "Traceback" not in out.stderr
  assert len(out.stderr.splitlines()) == 1, out.stderr
  assert out.stderr.startswith("error: --config.model.fusoin.width: the config has no such "
                               "field (did you mean --config.model.fusion.width")
  # A config argument its get_config refuses (an unknown tower preset): its message, not
  # absl's "FATAL Flags parsing error" with a traceback.
  out = _run("launch/count_params.py", "--config=configs/base.py:image=bogus,text=minilm")
  assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
  assert out.stderr.startswith("error: --config=configs/base.py:image=bogus,text=minilm: no "
                               "tower preset 'bogus' in configs/towers/ (presets: ")
  assert out.stderr.count("\n") == 1


def test_the_projects_own_errors_are_printed_without_a_traceback():
  """A bad config value (raised while the model is built) is reported as its
  message and where it was raised, exit status 1; MEDVQA_TRACEBACK=1 brings the traceback
  back, and errors that are not the project's own keep theirs."""
  import os
  args = ("launch/count_params.py", "--config=configs/demo.py", "--config.model.head=bogus")
  out = _run(*args)
  assert out.returncode == 1 and "Traceback" not in out.stderr
  assert out.stderr.startswith("error: --config.model.head='bogus': unknown head; expected "
                               "generative, classifier or none\n(raised at "
                               "medvqa_jax/models/amif.py:")
  full = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                        cwd=ROOT, env={**os.environ, "MEDVQA_TRACEBACK": "1"})
  assert full.returncode == 1 and "Traceback" in full.stderr
  assert "\nValueError: --config.model.head='bogus': unknown head" in full.stderr

  sys.path.insert(0, str(ROOT / "launch"))
  try:
    import common
  finally:
    sys.path.remove(str(ROOT / "launch"))
  from medvqa_jax.data import splits

  def raised(fn):
    try:
      fn()
    except Exception as e:  # noqa: BLE001
      return common._own_error(e)
    raise AssertionError("no error")

  where = raised(lambda: splits._need({"name": ""}, "name"))
  assert where and where.startswith("medvqa_jax/data/splits.py:")
  assert raised(lambda: json.loads("{")) is None  # The json library's own error.
  assert raised(lambda: [][1]) is None  # Not a ValueError: a bug keeps its traceback.
  from medvqa_jax.evaluate import metrics
  assert raised(lambda: metrics.vqa_accuracy([{}], ["x"])) is None  # Nor in the project's.


def test_urls_for_paths_are_refused_by_name():
  """Paths are files (a bucket must be mounted): a gs:// data or work folder, in a config
  field or a flag, is named before anything runs, instead of becoming a local 'gs:' folder."""
  out = _run("launch/count_params.py", "--config=configs/demo.py",
             "--config.data.dir=gs://b/tfds", "--config.train.workdir=/tmp/run")
  assert out.returncode == 2 and "Traceback" not in out.stderr and not out.stdout
  assert out.stderr.startswith("error: --config.data.dir=gs://b/tfds: paths are read as "
                               "files, not URLs")
  out = _run("launch/eval.py", "--checkpoint_dir=s3://b/run")
  assert out.returncode == 2 and out.stderr.startswith("error: --checkpoint_dir=s3://b/run:")
  # A config file's URL was read as FILE:ARG ("no config file 'gs'").
  out = _run("launch/count_params.py", "--config=gs://b/demo.py")
  assert out.returncode == 2 and out.stderr.startswith(
      "error: --config=gs://b/demo.py: paths are read as files, not URLs"), out.stderr


def test_commands_find_their_config_from_any_folder(tmp_path):
  """The scripts' --config paths (and defaults) are relative to the repository when the
  working folder does not hold them; a file found in neither place is named, without a
  traceback."""
  run = lambda *args: subprocess.run([sys.executable, str(ROOT / "launch" / "count_params.py"),
                                      *args], capture_output=True, text=True, timeout=300,
                                     cwd=tmp_path)
  for args in ((), ("--config=configs/demo.py",), ("--config", "configs/demo.py"),
               ("--config.model.fusion.width=32",)):  # An override of the default config.
    out = run(*args)
    assert out.returncode == 0, (args, out.stderr[-2000:])
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["head"] == "generative"
    assert (result["by_component"]["fusion"] < 200960) == ("--config.model.fusion.width=32" in args)
  missing = run("--config=configs/nope.py:x")
  assert missing.returncode == 2 and "Traceback" not in missing.stderr
  assert missing.stderr.startswith(f"error: --config: no config file 'configs/nope.py' "
                                   f"(looked in {tmp_path} and in {ROOT})")
  # Given twice, only the first was looked up and absl took the second (a traceback when that
  # was relative to the repository); a file that is no config was a traceback of its import.
  twice = run("--config=configs/demo.py", "--config=configs/vqa_rad.py")
  assert twice.returncode == 2 and twice.stderr.startswith(
      "error: --config is given 2 times: give one"), twice.stderr[-2000:]
  (tmp_path / "picture.jpg").write_bytes(b"\xff\xd8\xff\xe0 not python")
  (tmp_path / "empty.py").write_text("X = 1\n")
  # A tower preset and a part the run configs share were tracebacks of a missing field or
  # argument.
  for name, says in (("picture.jpg", "not a config file that loads (SyntaxError: "),
                     ("empty.py", "defines no get_config(), which a config file must"),
                     ("configs/towers/tiny.py", "not a run config (it has no model, data and "
                      "train fields): a tower preset (configs/towers/) is named in a run "
                      "config's argument, as --config=configs/base.py:image=NAME,text=NAME"),
                     ("configs/finetune.py", "not a run config (its get_config() takes other "
                      "arguments: get_config() missing 2 required keyword-only arguments")):
    bad = run(f"--config={name}")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert bad.stderr.startswith(f"error: --config={name}: {says}"), bad.stderr[-2000:]


@pytest.mark.parametrize("script", sorted(p.name for p in (ROOT / "launch").glob("*.py")
                                          if p.name != "common.py"))
def test_every_command_takes_help_and_refuses_an_unknown_flag(script):
  """--help prints the command's description and exits with 0 (absl's own exit status is 1);
  a flag the command does not have is a usage error, exit status 2, naming it."""
  helped = _run(f"launch/{script}", "--help")
  assert helped.returncode == 0, helped.stderr
  first = (ROOT / "launch" / script).read_text().split('"""')[1].splitlines()[0]
  assert helped.stdout.startswith(first), helped.stdout[:200]
  # The flags it takes are listed, those defined in launch/common.py included (absl listed
  # them under --helpfull only).
  source = (ROOT / "launch" / script).read_text()
  own = set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source))
  if "common.config_file_flag(" in source:
    own.add("config")
  if "common.cluster_flags()" in source:
    own.update(("coordinator_address", "num_processes", "process_id"))
  assert own and all(f"  --{name}:" in helped.stdout or f"  --[no]{name}:" in helped.stdout
                     for name in own), (sorted(own), helped.stdout[-1500:])
  bad = _run(f"launch/{script}", "--no_such_flag=1")
  assert bad.returncode == 2 and "Unknown command line flag 'no_such_flag'" in bad.stderr


@pytest.mark.parametrize("script,args", [
    ("eval.py", ["--checkpoint_dir=x", "--fsdp=0"]),
    ("benchmark_input.py", ["--data_dir=x", "--batch_size=0"]),
    ("benchmark_input.py", ["--data_dir=x", "--batches=0"]),
    ("cache_teacher.py", ["--config=configs/pretrain_stage1.py", "--out=x", "--batch_size=0"]),
    ("prepare_data.py", ["--dataset=vqa_rad", "--source_dir=x", "--data_dir=y",
                         "--max_bad_fraction=-1"])])
def test_counts_out_of_range_are_usage_errors(script, args):
  """Out-of-range counts ended in a ZeroDivisionError or a library's traceback, or (zero
  batches timed) a rate of 0; a negative bad fraction failed every build. Refused by the flag,
  exit status 2, before anything runs."""
  out = _run(f"launch/{script}", *args)
  flag = args[-1].split("=")[0].lstrip("-")
  assert out.returncode == 2, out.stderr[-2000:]
  assert f"flag --{flag}=" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_orbax_tracebacks_are_left_out_of_the_commands_output():
  """A save that fails (a full disk) was logged by Orbax with the same traceback from each of
  its threads, then once per unfinished write at exit: thousands of lines around the
  command's one-line error. Their one-line messages stay; nothing else is touched."""
  sys.path.insert(0, str(ROOT / "launch"))
  try:
    import common
  finally:
    sys.path.remove(str(ROOT / "launch"))
  try:
    raise ValueError("RESOURCE_EXHAUSTED: No space left on device")
  except ValueError:
    failure = sys.exc_info()
  orbax_file = "/venv/site-packages/orbax/checkpoint/_src/futures/future.py"

  def record(name, path, msg, exc_info=failure):
    return logging.LogRecord(name, logging.ERROR, path, 1, msg, None, exc_info)

  quiet = common._OrbaxTracebacks()
  thread = record("absl", orbax_file, "_SignalingThread.run() raised an exception")
  assert quiet.filter(thread) and thread.exc_info is None
  assert thread.getMessage() == "_SignalingThread.run() raised an exception"
  task = record("asyncio", "/py/asyncio/base_events.py", "Task exception was never retrieved\n"
                "future: <Task coro=<async_serialize() defined at /v/orbax/serialization.py>>")
  assert not quiet.filter(task)
  ours = record("absl", "/work/medvqa_jax/train/loop.py", "a failure of ours")
  other_task = record("asyncio", "/py/asyncio/base_events.py", "Task exception was never "
                      "retrieved\nfuture: <Task coro=<fetch() defined at /v/aiohttp/x.py>>")
  assert quiet.filter(ours) and ours.exc_info is failure
  assert quiet.filter(other_task) and other_task.exc_info is failure
  assert any(isinstance(f, common._OrbaxTracebacks) for f in logging.getLogger("absl").filters)
