"""Fine-tuning on ImageCLEF VQA-Med 2019.

  python launch/train.py --config=configs/vqa_med_2019.py --config.data.dir=/data/tfds \
      --config.train.workdir=/runs/vqa_med_2019 [--config.data.source_dir=DOWNLOAD]
"""

from configs import finetune


def get_config(arg=None):
  # The GCA's answer prior uncut: base.py's 1,024 word pieces would leave most of it out.
  # The 500 official test answers alone hold 564 distinct pieces (BERT uncased), 488 of them
  # in the 125 abnormality answers (111 distinct answers); the 14,792 training + validation
  # questions' answers, by the same growth, about 4,000.
  return finetune.get_config(arg, dataset="vqa_med_2019", epochs=20, val_split="validation",
                             prior_max_tokens=8192)
