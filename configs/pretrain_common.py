"""What both pre-training stages share: a caption corpus (ROCO by default; any builder of
launch/prepare_data.py), captions of 120 tokens (fewer where a text tower reads fewer; the
teacher's too), two augmented views per image, the teacher
from its cache, pre-training weight decay 0.02 (configs/base.py), bf16 compute with float32
parameters (the losses and Sinkhorn run in float32), validation on a held-out 2% of the
corpus every eval_every steps (the best checkpoint: lowest validation loss).

  python launch/train.py --config=configs/pretrain_stage0.py --config.data.dir=/data/tfds \
      --config.teacher.cache=/data/teacher_roco.npz --config.train.workdir=/runs/stage0
"""

from configs.towers.common import bf16, text_positions


def pretraining(config):
  # 120 tokens, or fewer where the tower reads fewer (the tiny tower: 64; CLIP's: 77).
  config.model.text.max_len = min(120, text_positions(config.model.text) or 120)
  # The teacher reads the captions at the same length, as the reference's teacher does (at
  # most what it can read: BiomedCLIP's 256 positions read 120, CLIP's 77 read 77, the tiny
  # teacher's 64 read 64), unless teacher.text.max_len is set (configs/base.py).
  bf16(config)
  # Validation: the objective and image<->text retrieval on a seeded 2% of the training
  # split's examples, held out (0: no validation; the corpus's own splits are not used).
  config.data.update(name="roco", val_split="", val_fraction=0.02)
  config.optim.total_steps = 10000
  config.train.update(batch_size=256, eval_every=1000, save_every=1000)
  return config
