"""Fine-tuning on PathVQA.

  python launch/train.py --config=configs/pathvqa.py --config.data.dir=/data/tfds \
      --config.train.workdir=/runs/pathvqa [--config.data.source_dir=DOWNLOAD]
"""

from configs import finetune


def get_config(arg=None):
  # The GCA's answer prior uncut: base.py's 1,024 word pieces would leave most of it out.
  # PathVQA's 200-answer test sample alone holds 303 distinct pieces (BERT uncased), growing
  # as n^0.63 over the sample: about 6,800 for its some 26,000 training + validation answers.
  return finetune.get_config(arg, dataset="pathvqa", epochs=20, val_split="validation",
                             prior_max_tokens=8192)
