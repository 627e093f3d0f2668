"""A scheduler's stop request (SIGTERM, sent ahead of a kill): the training loop finishes the
step in progress, saves a checkpoint of it and stops, so that the same command resumes with
nothing lost.

One process: `install()` (the launcher's) makes SIGTERM a request that the loop reads at its
next step boundary (`reached`) while it is `listening()`; anywhere else (building data,
evaluating test), and on a second SIGTERM, it stops at once, as Ctrl-C does.
Several processes: JAX's distributed runtime takes SIGTERM as a preemption notice (joining
replaces Python's handler with its own), and the processes agree on the one step after which
all of them save and stop (`reached_preemption_sync_point`): a process that stopped alone
would leave the others waiting in a collective. The loop asks at every step, as that requires,
and nothing else may ask: the agreement starts from each process's last step asked (Orbax's
own asking is turned off, `checkpoint._Manager`).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import jax
from jax.experimental import multihost_utils

_state = {"listening": False, "requested": False, "deferring": False, "deferred": None}


def _on_sigterm(signum, frame):
  del frame
  if _state["listening"] and not _state["requested"]:
    _state["requested"] = True
    print("SIGTERM: stopping after the step in progress, with a checkpoint of it (a second "
          "SIGTERM stops at once)", file=sys.stderr, flush=True)
    return
  _stop(signum)


def _stop(signum):
  """Stops at once, or, inside `deferred()`, when it ends."""
  if _state["deferring"]:
    _state["deferred"] = _state["deferred"] or signal.Signals(signum).name
    return
  raise KeyboardInterrupt(signal.Signals(signum).name)


@contextlib.contextmanager
def deferred():
  """A block that Ctrl-C (or a second SIGTERM) does not cut short: one that comes inside it
  stops the run as the block ends. For a checkpoint's save, whose first part copies the
  state to the host: interrupted there, the checkpoint was lost (the steps since the one
  before, too), where the rest of a save is always finished before the run stops."""
  # Ctrl-C as Python handles it by default (KeyboardInterrupt) is held; one ignored (a
  # background job's) or handled otherwise is left as it is. Handlers are the main thread's.
  held = (threading.current_thread() is threading.main_thread()
          and signal.getsignal(signal.SIGINT) is signal.default_int_handler)
  if held:
    signal.signal(signal.SIGINT, lambda signum, frame: _stop(signum))
  _state.update(deferring=True, deferred=None)
  try:
    yield
  finally:
    if held:
      signal.signal(signal.SIGINT, signal.default_int_handler)
    _state["deferring"] = False
  if _state["deferred"]:
    print(f"{_state['deferred']}: stopping, the checkpoint being written finished first",
          file=sys.stderr, flush=True)
    raise KeyboardInterrupt(_state["deferred"])


def install() -> None:
  """SIGTERM requests a stop at the training loop's next step boundary (one process). Call it
  before joining a multi-host run, whose runtime then takes SIGTERM over."""
  signal.signal(signal.SIGTERM, _on_sigterm)


@contextlib.contextmanager
def listening():
  """The training steps: a SIGTERM inside them waits for the loop to ask (`reached`). Leaving
  them after one, whether the loop stopped at it or the steps ended first (the last step's
  checkpoint is then the one to resume from), raises KeyboardInterrupt."""
  _state.update(listening=True, requested=False)
  try:
    yield
  finally:
    _state["listening"] = False
  if _state["requested"]:
    raise KeyboardInterrupt("SIGTERM")


def reached(step: int) -> bool:
  """Whether the run saves `step` and stops: the same answer on every process (call it at
  every step, on every process, with increasing steps)."""
  agreed = multihost_utils.reached_preemption_sync_point(step)  # False without a cluster.
  if jax.process_count() > 1:  # Only the agreed step: a process stopping alone would hang.
    _state["requested"] = agreed
  else:
    _state["requested"] = _state["requested"] or agreed
  return _state["requested"]  # Also what leaving `listening()` reads.
