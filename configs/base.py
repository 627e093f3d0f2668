"""Base config: the image and text towers, and the soft-label teacher.

Towers are picked by preset name (files in configs/towers/), e.g.
  --config=configs/base.py:image=clip_vit_b16,text=bio_clinicalbert,teacher=biomedclip
and any field is overridable, e.g. --config.model.image.checkpoint=/ckpt/clip-vit-base-patch16.
Defaults are the paper's: CLIP ViT-B/16 image tower, Bio_ClinicalBERT text tower,
BiomedCLIP teacher.
"""

import importlib

import ml_collections

DEFAULTS = dict(image="clip_vit_b16", text="bio_clinicalbert", teacher="biomedclip")


def preset(name: str) -> ml_collections.ConfigDict:
  try:
    module = importlib.import_module(f"configs.towers.{name}")
  except ModuleNotFoundError:
    raise ValueError(f"no tower preset {name!r} in configs/towers/") from None
  return module.get_config()


def parse_arg(arg: str | None) -> dict:
  choice = dict(DEFAULTS)
  for item in filter(None, (arg or "").split(",")):
    key, sep, value = item.partition("=")
    if not sep or key not in DEFAULTS:
      raise ValueError(f"config argument {item!r}: expected one of "
                       f"{', '.join(k + '=PRESET' for k in DEFAULTS)}")
    choice[key] = value
  return choice


def get_config(arg=None):
  choice = parse_arg(arg)
  image, text, teacher = (preset(choice[k]) for k in ("image", "text", "teacher"))
  for part, cfg in (("image", image), ("text", text)):
    if part not in cfg:
      raise ValueError(f"tower preset {choice[part]!r} has no {part} tower")
  if "image" not in teacher or "text" not in teacher:
    raise ValueError(f"teacher preset {choice['teacher']!r} needs an image and a text tower")
  config = ml_collections.ConfigDict(dict(
      seed=0,
      model=dict(image=image.image, text=text.text),
      teacher=dict(image=teacher.image, text=teacher.text),
  ))
  config.lock()
  return config
