r"""Where the device's time goes in a profiler trace: totals by kind of work, by model part
(JAX name scope) and by op, in ms per step.

  python benchmarks/trace_summary.py RUN/trace.json.gz --steps=5           # as traced by
      # python launch/benchmark.py --config=... --profile_dir=RUN (5 steps by default)
  python benchmarks/trace_summary.py TRACE --steps=5 --depth=2 --top=30    # finer

TRACE: Chrome trace events, as `launch/benchmark.py --profile_dir` keeps them
(`trace.json.gz`) or as `jax.profiler.trace(..., create_perfetto_trace=True)` writes them
(`plugins/profile/*/perfetto_trace.json.gz`). --json prints the totals as one JSON line.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medvqa_jax.train import trace  # noqa: E402


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("trace", help="trace.json.gz (or .json) of the traced steps")
  parser.add_argument("--steps", type=int, default=1, help="steps the trace holds (totals "
                      "are divided by it)")
  parser.add_argument("--depth", type=int, default=1, help="name-scope components kept")
  parser.add_argument("--top", type=int, default=15, help="ops listed")
  parser.add_argument("--json", action="store_true", help="one JSON line instead of tables")
  args = parser.parse_args()
  if not Path(args.trace).is_file():
    print(f"error: {args.trace}: no such file", file=sys.stderr)
    return 1
  try:
    s = trace.summarize(args.trace, steps=args.steps, depth=args.depth, top=args.top)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(s) if args.json else trace.format_summary(s))
  return 0


if __name__ == "__main__":
  sys.exit(main())
