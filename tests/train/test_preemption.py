"""SIGTERM in one process (preemption.py): at once outside the training steps; inside them a
request that the loop reads at its step boundary, and that stops the run when the steps are
left (the loop stopped at it, or they ended first); a second SIGTERM at once. The loop's use
of it, on one and on two processes, is tested end to end in test_loop.py."""

import os
import signal

import pytest

from medvqa_jax.train import preemption


@pytest.fixture(autouse=True)
def handler():
  previous = signal.getsignal(signal.SIGTERM)
  preemption.install()
  yield
  signal.signal(signal.SIGTERM, previous)


def _sigterm():
  os.kill(os.getpid(), signal.SIGTERM)  # The handler runs before os.kill returns to Python.


def test_outside_the_training_steps_sigterm_stops_at_once():
  with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
    _sigterm()


def test_inside_them_it_waits_for_the_step_boundary_and_stops_the_run_after_it(capsys):
  asked = []
  with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
    with preemption.listening():
      asked.append(preemption.reached(1))
      _sigterm()  # No exception here: the step in progress goes on.
      asked.append(preemption.reached(2))
  assert asked == [False, True]
  assert "stopping after the step in progress" in capsys.readouterr().err


def test_a_request_after_the_last_step_boundary_stops_the_run_when_the_steps_end():
  with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
    with preemption.listening():
      _sigterm()  # E.g. during the last step's validation: no boundary follows.


def test_a_second_sigterm_stops_at_once():
  second = []
  with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
    with preemption.listening():
      _sigterm()
      try:
        _sigterm()
      except KeyboardInterrupt:
        second.append("raised at once")
  assert second == ["raised at once"]


def test_without_a_request_the_training_steps_end_as_usual():
  with preemption.listening():
    assert not preemption.reached(1) and not preemption.reached(2)
  # Once they are left (evaluating test, say), a SIGTERM stops at once again.
  with pytest.raises(KeyboardInterrupt, match="SIGTERM"):
    _sigterm()


@pytest.mark.parametrize("stop", ["SIGINT", "second SIGTERM"])
def test_inside_a_save_ctrl_c_stops_the_run_when_the_save_is_done(stop, capsys):
  """A checkpoint's save copies the state to the host first: Ctrl-C there lost the checkpoint
  (the run stopped naming the one before). It waits for the save, then stops the run."""
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # Python's own.
  try:
    _save_interrupted(stop, capsys)
  finally:
    signal.signal(signal.SIGINT, previous)


def _save_interrupted(stop, capsys):
  saved = []
  with pytest.raises(KeyboardInterrupt, match=stop.split()[-1]):
    with preemption.listening():
      if stop == "second SIGTERM":
        _sigterm()  # The first: a request for the step boundary.
      with preemption.deferred():
        os.kill(os.getpid(), getattr(signal, stop.split()[-1]))
        saved.append("the save went on")
  assert saved == ["the save went on"]
  assert "the checkpoint being written finished first" in capsys.readouterr().err
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # Restored.
  with pytest.raises(KeyboardInterrupt):  # Outside a save: at once, as before.
    os.kill(os.getpid(), signal.SIGINT)
  # Ctrl-C ignored (a background job's): still ignored inside a save.
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  with preemption.deferred():
    os.kill(os.getpid(), signal.SIGINT)
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
