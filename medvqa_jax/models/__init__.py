# Threefry compiled unrolled on the CPU (see medvqa_jax/cpu_rng.py): the same bits, compiled
# faster; registered before any of the model's programs is lowered.
from medvqa_jax import cpu_rng

cpu_rng.install()
