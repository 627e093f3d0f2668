"""Fine-tuning on PathVQA.

  python launch/train.py --config=configs/pathvqa.py --config.data.dir=/data/tfds \
      --config.train.workdir=/runs/pathvqa [--config.data.source_dir=DOWNLOAD]
"""

from configs import finetune


def get_config(arg=None):
  # The GCA's answer prior uncut: base.py's 1,024 word pieces would leave most of it out.
  # PathVQA's 200-answer test sample alone holds 303 distinct pieces (BERT uncased); a power
  # law fitted to its growth puts its some 26,000 training + validation answers at 5,000 to
  # 12,500 (the exponent varies with the fit). The prior costs what the answers hold; only
  # launch/benchmark.py's synthetic prior takes the cap's size.
  return finetune.get_config(arg, dataset="pathvqa", epochs=20, val_split="validation",
                             prior_max_tokens=16384)
