r"""Where the device's time goes in a profiler trace: totals by kind of work, by model part
(JAX name scope) and by op, in ms per step.

  python benchmarks/trace_summary.py RUN/trace.json.gz --steps=5           # as traced by
      # python launch/benchmark.py --config=... --profile_dir=RUN (5 steps by default)
  python benchmarks/trace_summary.py TRACE --steps=5 --depth=2 --top=30    # finer

TRACE: Chrome trace events, as `launch/benchmark.py --profile_dir` keeps them
(`trace.json.gz`) or as `jax.profiler.trace(..., create_perfetto_trace=True)` writes them
(`plugins/profile/*/perfetto_trace.json.gz`). --json prints the totals as one JSON line.
--hlo: the compiled step's op table, which names the GPU kernels that do not carry their JAX
op's name (default: `hlo_ops.json.gz` beside the trace, as `launch/benchmark.py` keeps it).
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medvqa_jax.train import trace  # noqa: E402


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("trace", help="trace.json.gz (or .json) of the traced steps")
  parser.add_argument("--steps", type=int, default=1, help="steps the trace holds (totals "
                      "are divided by it)")
  parser.add_argument("--depth", type=int, default=1, help="name-scope components kept (1 "
                      "or more)")
  parser.add_argument("--top", type=int, default=15, help="ops listed, the longest first (0: "
                      "none)")
  parser.add_argument("--json", action="store_true", help="one JSON line instead of tables")
  parser.add_argument("--hlo", help="the HLO op table (default: hlo_ops.json.gz beside the "
                      "trace, if there)")
  args = parser.parse_args(argv)
  # Out of range, they printed tables anyway: the named ops under one blank scope (0), the
  # scopes cut short of their last part (-1), no ops at all (-2).
  if args.depth < 1:
    parser.error(f"--depth={args.depth}: the name-scope components to keep, 1 or more")
  if args.top < 0:
    parser.error(f"--top={args.top}: the ops to list, 0 (none) or more")
  for path in (args.trace, args.hlo):
    if path and Path(path).is_dir():
      inside = Path(path) / ("trace.json.gz" if path == args.trace else "hlo_ops.json.gz")
      print(f"error: {path}: is a folder; give the file in it"
            + (f" ({inside})" if inside.is_file() else ""), file=sys.stderr)
      return 1
    if path and not Path(path).is_file():
      print(f"error: {path}: no such file", file=sys.stderr)
      return 1
  beside = Path(args.trace).parent / "hlo_ops.json.gz"
  hlo_path = args.hlo or (str(beside) if beside.is_file() else None)
  try:
    hlo = trace.load_hlo_ops(hlo_path) if hlo_path else None
    s = trace.summarize(args.trace, steps=args.steps, depth=args.depth, top=args.top, hlo=hlo)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(json.dumps(s) if args.json else trace.format_summary(s))
  return 0


if __name__ == "__main__":
  sys.exit(main())
