"""Files written whole: a killed writer's temporary file is removed by the next write, and an
evaluation's metrics.json, written last, never stands beside another evaluation's
predictions."""

import json
import os
import socket
import subprocess
import sys

import pytest

from medvqa_jax import files
from medvqa_jax.evaluate import vqa


def _dead_pid() -> int:
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  return child.pid


def test_the_temporary_files_of_writers_no_longer_running_are_removed(tmp_path):
  """This host's writers' only: another host's process ids mean nothing here (its write in
  progress to a shared folder would be removed under it)."""
  target = tmp_path / "cache[1].npz"  # A name with glob characters.
  dead, live, host = _dead_pid(), os.getppid(), socket.gethostname()
  (tmp_path / f".cache[1].npz.tmp-{host}-{dead}").write_bytes(b"x" * 1000)  # Left by a kill.
  kept = [f".cache[1].npz.tmp-{host}-{dead}-dir",  # Not a temporary of ours.
          f".cache[1].npz.tmp-{host}-{live}",  # Another writer, running.
          f".cache[1].npz.tmp-other-host-{dead}",  # Another host's.
          f".other.npz.tmp-{host}-{dead}"]  # Another file's.
  for name in kept:
    (tmp_path / name).write_bytes(b"y")
  left = tmp_path / "tok"
  (tmp_path / f".tok.tmp-{host}-{dead}").mkdir()  # A folder written whole (a tokenizer copy).
  (tmp_path / f".tok.tmp-{host}-{dead}" / "vocab.txt").write_text("a")
  assert files.temporary(target) == tmp_path / f".cache[1].npz.tmp-{host}-{os.getpid()}"
  assert files.temporary(left) == tmp_path / f".tok.tmp-{host}-{os.getpid()}"
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)


def test_another_users_running_writer_keeps_its_temporary_file(tmp_path, monkeypatch):
  """A process of another user cannot be signalled (os.kill says PermissionError), but it is
  running: its write in progress to a shared folder is left alone; a dead writer's is
  removed."""
  other, dead, host = _dead_pid(), _dead_pid(), socket.gethostname()
  kill = os.kill

  def as_another_users(pid, signal):
    if pid == other:
      raise PermissionError(1, "Operation not permitted")
    return kill(pid, signal)
  monkeypatch.setattr(os, "kill", as_another_users)
  for pid in (other, dead):
    (tmp_path / f".cache.npz.tmp-{host}-{pid}").write_bytes(b"x")
  files.temporary(tmp_path / "cache.npz")
  assert [p.name for p in tmp_path.iterdir()] == [f".cache.npz.tmp-{host}-{other}"]


def test_metrics_are_never_left_beside_another_evaluations_predictions(tmp_path, monkeypatch):
  """A run extended and evaluated again, killed between the two renames, left step 6's
  metrics.json beside step 9's predictions.jsonl."""
  rows = lambda step: [{"question_id": "1", "prediction": f"answer at {step}"}]
  vqa.write(tmp_path, {"protocol": "open-set", "step": 6}, rows(6))
  (tmp_path / f".metrics.json.tmp-{socket.gethostname()}-{_dead_pid()}").write_text("{")
  real = os.replace

  def killed_after_predictions(src, dst):
    real(src, dst)
    if str(dst).endswith("predictions.jsonl"):
      raise KeyboardInterrupt
  monkeypatch.setattr(os, "replace", killed_after_predictions)
  with pytest.raises(KeyboardInterrupt):
    vqa.write(tmp_path, {"protocol": "open-set", "step": 9}, rows(9))
  assert not (tmp_path / "metrics.json").exists()  # Incomplete: no metrics at all.
  assert "answer at 9" in (tmp_path / "predictions.jsonl").read_text()
  monkeypatch.setattr(os, "replace", real)
  vqa.write(tmp_path, {"protocol": "open-set", "step": 9}, rows(9))
  assert json.loads((tmp_path / "metrics.json").read_text())["step"] == 9
  assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json", "predictions.jsonl"]
