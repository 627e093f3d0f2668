"""Accuracy breakdowns, the majority baseline's answer and the attention picture."""

import numpy as np
from PIL import Image
import pytest

from medvqa_jax.data.splits import majority_answer
from medvqa_jax.evaluate import metrics, visualize


def _rec(answers, atype, qtype):
  return {"answers": answers, "answer_type": atype, "question_type": qtype}


RECORDS = [
    _rec(["Yes"], "CLOSED", "PRES"),          # yes/no, closed
    _rec(["no"], "CLOSED ", "PRES"),          # type with a trailing space, as in VQA-RAD
    _rec(["left"], "CLOSED", "POS"),          # closed by type, open by the yes/no rule
    _rec(["MRI"], "OPEN", "MODALITY"),
    _rec(["x-ray", "radiograph"], "OPEN", "MODALITY"),  # alternatives
]


def test_accuracies_by_both_closed_definitions_and_category():
  predictions = ["yes", "yes", "left", "ct", "Radiograph."]
  m = metrics.vqa_accuracy(RECORDS, predictions)
  assert m["questions"] == 5 and m["overall"] == pytest.approx(3 / 5)
  assert m["by_answer_type"]["CLOSED"] == {"accuracy": pytest.approx(2 / 3), "questions": 3}
  assert m["closed"] == pytest.approx(2 / 3) and m["open"] == pytest.approx(1 / 2)
  assert m["by_yes_no"]["closed"] == {"accuracy": pytest.approx(1 / 2), "questions": 2}
  assert m["by_yes_no"]["open"] == {"accuracy": pytest.approx(2 / 3), "questions": 3}
  assert m["by_question_type"]["MODALITY"] == {"accuracy": pytest.approx(1 / 2), "questions": 2}
  assert m["by_question_type"]["POS"]["accuracy"] == 1.0
  with pytest.raises(ValueError, match="4 predictions for 5 questions"):
    metrics.vqa_accuracy(RECORDS, predictions[:4])


def test_no_answer_type_field():
  m = metrics.vqa_accuracy([_rec(["yes"], "", "")], ["yes"])
  assert m["open"] is None and m["closed"] is None and m["overall"] == 1.0
  assert "by_question_type" not in m and m["by_yes_no"]["closed"]["questions"] == 1


def test_majority_answer_is_the_most_frequent_normalised_reference():
  recs = [_rec([a], "", "") for a in ("Yes", "no", "NO", "No.", "yes")]
  assert majority_answer(recs) == "no"


def test_heatmap_points_at_the_attended_patch():
  heads, lt, g = 3, 5, 4
  w = np.full((heads, lt, 1 + g * g), 0.01)
  w[:, 1:3, 1 + 6] = [0.9, 0.3]  # the question's words attend to patch (1, 2),
  w[:, 2, 1 + 7] = 0.6      # the second also to (1, 3): averaged over the words, half as much
  w[:, 0, 1 + 9] = 5.0      # CLS is left out,
  w[:, 3, 1 + 10] = 5.0     # SEP too,
  w[:, 4:, 1 + 12] = 5.0    # and padding
  mask = np.array([1, 1, 1, 1, 0])
  heat = visualize.patch_heatmap(w, mask)
  assert heat.shape == (g, g) and np.unravel_index(heat.argmax(), heat.shape) == (1, 2)
  assert heat.min() == 0 and heat.max() == 1
  assert heat[1, 3] == pytest.approx(0.5)


def test_heatmap_averages_the_heads():
  """Heads that attend differently are averaged (not one head's peak taken): the map is the
  NumPy mean over heads, then over the question's words, scaled to [0, 1]."""
  rng = np.random.default_rng(0)
  heads, lt, g = 4, 6, 3
  w = rng.random((heads, lt, 1 + g * g))
  mask = np.array([1, 1, 1, 1, 1, 0])  # CLS, three words, SEP, padding
  words = w[:, 1:4, 1:].mean(axis=(0, 1)).reshape(g, g)
  want = (words - words.min()) / (words.max() - words.min())
  np.testing.assert_allclose(visualize.patch_heatmap(w, mask), want, atol=1e-12)


def test_the_picture_overlays_the_heatmap_on_the_image():
  """The right panel is the image (the left panel) with red blended in where the question
  attends: 60% red at the hottest patch, the image itself where the heatmap is 0."""
  y, x = np.mgrid[0:32, 0:32]
  pixels = np.stack([4 * x + 40, 4 * y + 40, np.full_like(x, 90)], -1).astype(np.uint8)
  image = Image.fromarray(pixels)
  g, size = 8, 384
  heat = np.zeros((g, g))
  heat[2, 5] = 1.0
  drawn = np.asarray(visualize.render(image, heat, ["is"], np.array([0.5]), "is it?",
                                      [("no", 0.5)], size=size)).astype(float)
  left, right = drawn[:size, :size], drawn[:size, size:2 * size]
  cell = size // g
  centre = (2 * cell + cell // 2, 5 * cell + cell // 2)
  red = np.array([255, 40, 0])
  np.testing.assert_allclose(right[centre], 0.6 * red + 0.4 * left[centre], atol=3)
  # The reddest cell of the overlay (red against the image) is the hot one.
  redness = (right[..., 0] - left[..., 0]).reshape(g, cell, g, cell).mean(axis=(1, 3))
  assert np.unravel_index(redness.argmax(), redness.shape) == (2, 5)
  # Cells at least two away from the hot one (beyond the resize's reach) are untouched.
  far = np.ones((g, g), bool)
  far[0:5, 3:8] = False
  far = np.kron(far, np.ones((cell, cell), bool))
  assert far.sum() > size * size / 2 and np.array_equal(right[far], left[far])


def test_the_gate_bars_are_as_long_as_the_gates():
  """Each question token's bar is 200 pixels at gate 1, proportionally shorter below: its
  length, in the bar colour, read off the picture row by row."""
  gates = np.array([0.1, 0.3, 0.8, 1.0])
  tokens = ["[CLS]", "is", "it", "[SEP]"]
  drawn = np.asarray(visualize.render(Image.new("RGB", (32, 32), "gray"), np.zeros((4, 4)),
                                      tokens, gates, "is it?", [("no", 0.5)]))
  bar = np.all(drawn[384:] == (40, 90, 200), axis=-1)  # Below the image panels.
  widths = bar.sum(axis=1)
  rows = np.flatnonzero(widths)
  bands = np.split(rows, np.flatnonzero(np.diff(rows) > 1) + 1)
  assert len(bands) == len(gates)
  for band, gate in zip(bands, gates):
    assert np.ptp(widths[band]) == 0 and abs(widths[band[0]] - 200 * gate) <= 1, (band, gate)


def test_the_picture_shows_small_scores():
  """The generative head's sequence probabilities are small (1e-5): two answers of different
  scores once both read 0.000. The pictures differ now."""
  image = Image.new("RGB", (32, 32), "gray")
  draw = lambda score: np.asarray(visualize.render(
      image, np.zeros((4, 4)), ["is"], np.array([0.5]), "is it?", [("no", score)]))
  assert not np.array_equal(draw(5.2e-5), draw(6.5e-6))


def test_the_baseline_and_the_printed_summary_break_down_by_category():
  """VQA-Med-2019 has no answer_type: its protocol is per category (question_type). The
  majority baseline is broken down by category too, and the printed summary shows both."""
  from medvqa_jax.data.splits import Split
  from medvqa_jax.evaluate import vqa
  records = [_rec(["no"], "", "abnormality"), _rec(["yes"], "", "abnormality"),
             _rec(["axial"], "", "plane"), _rec(["ct"], "", "modality")]
  split = Split("test", None, records)
  rows = [{"prediction": p} for p in ("no", "no", "axial", "mri")]
  m = vqa.evaluate(rows, split, "open-set", 7, baseline="no")
  assert m["majority_baseline"]["by_question_type"] == {
      "abnormality": {"accuracy": 0.5, "questions": 2},
      "modality": {"accuracy": 0.0, "questions": 1}, "plane": {"accuracy": 0.0, "questions": 1}}
  lines = vqa.summary(m).splitlines()
  assert "  abnormality *              50.0      50.0" in lines
  assert "  plane *                   100.0       0.0" in lines
  assert lines[-1] == "  majority answer: 'no'; * question type (category)"


def test_the_baseline_columns_are_the_majority_answers_and_every_question_is_counted():
  """The majority baseline's closed, open and yes/no columns are the majority answer's own,
  not the model's; a question is yes/no only when every alternative is; a question without
  an answer type is counted under "(none)", so each breakdown adds up to all questions."""
  from medvqa_jax.data.splits import Split
  from medvqa_jax.evaluate import vqa
  records = RECORDS + [_rec(["yes", "present"], "", "")]  # Yes or another word: open.
  rows = [{"prediction": p} for p in ("no", "yes", "x", "mri", "x", "present")]
  m = vqa.evaluate(rows, Split("test", None, records), "open-set", 3, baseline="yes")
  base = m["majority_baseline"]
  assert base["answer"] == "yes" and base["overall"] == pytest.approx(2 / 6)
  assert base["closed"] == pytest.approx(1 / 3) and base["open"] == 0.0
  assert base["by_yes_no"]["closed"] == {"accuracy": 0.5, "questions": 2}
  assert base["by_yes_no"]["open"] == {"accuracy": 0.25, "questions": 4}
  assert m["by_yes_no"]["closed"] == {"accuracy": 0.0, "questions": 2}
  assert m["by_yes_no"]["open"] == {"accuracy": 0.5, "questions": 4}
  assert m["by_answer_type"]["(none)"] == {"accuracy": 1.0, "questions": 1}
  assert sum(v["questions"] for v in m["by_answer_type"].values()) == len(records)


def test_questions_without_an_answer_the_model_can_give_are_counted():
  """Under the open-set protocol an answer first seen in test cannot be predicted (43 of
  VQA-RAD's 451 test questions): metrics.json says how many questions have a correct answer
  among those the model can give (`answerable`, alternatives counted), and the summary the
  ceiling. Without `predictable` (validation), nothing is said."""
  from medvqa_jax.data.splits import Split
  from medvqa_jax.evaluate import vqa
  records = [_rec(["No"], "CLOSED", ""), _rec(["Left lung"], "OPEN", ""),
             _rec(["pons", "brain stem"], "OPEN", ""), _rec(["a rib"], "OPEN", "")]
  split = Split("test", None, records)
  rows = [{"prediction": p} for p in ("no", "yes", "brain stem", "yes")]
  m = vqa.evaluate(rows, split, "open-set", 7, baseline="no",
                   predictable=["no", "yes", "brain stem", "rib"])
  assert m["answerable"] == 3 and m["overall"] == 0.5
  assert ("  note: 1 of the 4 questions have no correct answer among those the model can "
          "give: at most 75.0% can be right") in vqa.summary(m).splitlines()
  full = vqa.evaluate(rows, split, "open-set", 7, predictable=["no", "left lung", "pons", "rib"])
  assert full["answerable"] == 4 and "at most" not in vqa.summary({**full, **{
      "majority_baseline": m["majority_baseline"]}})
  assert "answerable" not in vqa.evaluate(rows, split, "open-set", 7)
