"""The ``mm_shapes`` dataset.

Answers are checked against the scene by an independent reader of the question
text and images against the scene; then balance, determinism, and small real
TFDS builds read back without TensorFlow.
"""

import collections
import functools
import re
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.data import mm_shapes as ms

CONFIGS = ("simple", "relational")
NUM_SAMPLES = 2000


class TinyMmShapes(ms.MmShapes):
  """``mm_shapes`` with small splits, registered under its own name."""
  name = "tiny_mm_shapes"
  SPLIT_SIZES = {"train": 64, "validation": 16, "test": 16}


@functools.cache
def samples(config: str) -> list[ms.Sample]:
  return [ms.sample_question(ms.example_rng(config, "train", i), config)
          for i in range(NUM_SAMPLES)]


# An answerer that knows the question templates but none of the generator.

SIZES = "|".join(ms.SIZES)
COLORS = "|".join(ms.COLORS)
SHAPES = "|".join(ms.SHAPES)
REF = rf"the (?:(?:{SIZES}) )?(?:(?:{COLORS}) )?(?:{SHAPES}|shape)"


def find(scene: ms.Scene, phrase: str) -> int:
  """The only object that ``phrase`` ("the small red shape") fits."""
  words = phrase.split()[1:]
  match = np.ones(len(scene.x), bool)
  for word in words:
    for name, vocab in (("size", ms.SIZES), ("color", ms.COLORS),
                        ("shape", ms.SHAPES)):
      if word in vocab:
        match &= getattr(scene, name) == vocab.index(word)
  assert match.sum() == 1, f"{phrase!r} fits {match.sum()} objects"
  return int(match.argmax())


def number(scene: ms.Scene, plural: str) -> int:
  """How many objects ``plural`` ("circles", "red shapes") names."""
  word = plural.split()[0].removesuffix("s")
  if word in ms.SHAPES:
    return int(np.sum(scene.shape == ms.SHAPES.index(word)))
  return int(np.sum(scene.color == ms.COLORS.index(word)))


def left_of(scene: ms.Scene, a: int, b: int) -> bool:
  assert abs(scene.x[a] - scene.x[b]) >= ms.MIN_DX
  return scene.x[a] < scene.x[b]


def nearest(scene: ms.Scene, a: int) -> int:
  distance = np.hypot(scene.x - scene.x[a], scene.y - scene.y[a])
  distance[a] = np.inf
  first, second = np.sort(distance)[:2]
  assert second - first >= ms.MIN_NEAREST_GAP
  return int(distance.argmin())


def yes_no(value: bool) -> str:
  return "yes" if value else "no"


def only(scene: ms.Scene, name: str, word: str, vocab) -> int:
  (i,) = np.flatnonzero(getattr(scene, name) == vocab.index(word))
  return i


def answer(scene: ms.Scene, question: str) -> str:
  """The answer to ``question`` read off ``scene``."""
  rules = [
      (rf"is there a ({COLORS}) ({SHAPES})", lambda c, s: yes_no(np.any(
          (scene.color == ms.COLORS.index(c)) &
          (scene.shape == ms.SHAPES.index(s))))),
      (r"how many (\w+s|\w+ shapes) are there",
       lambda p: str(number(scene, p))),
      (rf"what color is the ({SHAPES})",
       lambda s: ms.COLORS[scene.color[only(scene, "shape", s, ms.SHAPES)]]),
      (rf"what shape is the ({COLORS}) object",
       lambda c: ms.SHAPES[scene.shape[only(scene, "color", c, ms.COLORS)]]),
      (rf"is ({REF}) left of ({REF})", lambda a, b: yes_no(
          left_of(scene, find(scene, a), find(scene, b)))),
      (rf"what color is the object nearest to ({REF})",
       lambda a: ms.COLORS[scene.color[nearest(scene, find(scene, a))]]),
      (rf"how many shapes are left of ({REF})", lambda a: str(sum(
          left_of(scene, j, find(scene, a))
          for j in range(len(scene.x)) if j != find(scene, a)))),
      (r"are there more (\w+s|\w+ shapes) than (\w+s|\w+ shapes)",
       lambda p, q: yes_no(number(scene, p) > number(scene, q))),
      (rf"is there another shape with the same color as ({REF})", lambda a:
       yes_no(np.sum(scene.color == scene.color[find(scene, a)]) > 1)),
  ]
  for pattern, rule in rules:
    match = re.fullmatch(pattern + r"\?", question)
    if match:
      return rule(*match.groups())
  raise AssertionError(f"No template reads {question!r}")


# Examples.


@pytest.mark.parametrize("config", CONFIGS)
def test_examples_are_well_formed(config):
  spec = ms.get_spec(config)
  for i in range(100):
    example = ms.generate_example(ms.example_rng(config, "test", i), config)
    assert example["image"].shape == (32, 32, 3)
    assert example["image"].dtype == np.uint8
    assert isinstance(example["question"], str) and example["question"]
    assert example["question_type"] in spec.question_types
    assert example["answer"] in ms.answer_choices(example["question_type"])
    low, high = spec.num_objects
    assert example["num_objects"].dtype == np.int32
    assert low <= example["num_objects"] <= high
    counts = re.findall(r"\b(a|two|three|four|five|six) ", example["caption"])
    assert sum(("a", "two", "three", "four", "five", "six").index(c) + 1
               for c in counts) == example["num_objects"], example["caption"]
    assert len(example["question"].split()) <= 16  # The tokenizer's max_len.


@pytest.mark.parametrize("config", CONFIGS)
def test_answers_follow_from_the_scene(config):
  for sample in samples(config):
    assert answer(sample.scene, sample.question) == sample.answer, sample


def test_colour_questions_do_not_name_the_colour_of_their_object():
  # A description like "the red shape" would rule answers out.
  for sample in samples("relational"):
    if sample.question_type in ("nearest_color", "same_color"):
      assert not set(sample.question.split()) & set(ms.COLORS), sample.question


@pytest.mark.parametrize("config", CONFIGS)
def test_scenes_fit_the_image_without_touching(config):
  spec = ms.get_spec(config)
  for sample in samples(config)[:500]:
    s = sample.scene
    low, high = np.array(spec.radii)[s.size].T
    assert np.all((low <= s.radius) & (s.radius <= high))
    assert np.all((s.x - s.radius >= 0) & (s.x + s.radius < 32))
    assert np.all((s.y - s.radius >= 0) & (s.y + s.radius < 32))
    gap_NxN = s.radius[:, None] + s.radius + 2
    apart = ((np.abs(s.x[:, None] - s.x) >= gap_NxN) |
             (np.abs(s.y[:, None] - s.y) >= gap_NxN))
    assert np.all(apart | np.eye(len(s.x), dtype=bool))


@pytest.mark.parametrize("config", CONFIGS)
def test_image_shows_the_scene(config):
  rng = np.random.default_rng(0)
  for sample in samples(config)[:300]:
    s = sample.scene
    image = ms.render(s, rng).astype(int)
    background = np.ones((32, 32), bool)
    for shape, color, r, x, y in zip(s.shape, s.color, s.radius, s.x, s.y):
      box = image[y - r:y + r + 1, x - r:x + r + 1]
      rgb = ms.COLOR_RGB[color]
      painted = np.all((box >= rgb) & (box < rgb + ms.NOISE), axis=-1)
      assert painted[r, r], "the centre pixel has the object's colour"
      # Fraction of the bounding box covered: square 1, circle ~0.75,
      # triangle ~0.5.
      fill = painted.mean()
      seen = "square" if fill > 0.9 else "circle" if fill > 0.65 else "triangle"
      assert seen == ms.SHAPES[shape], (fill, r)
      background[y - r:y + r + 1, x - r:x + r + 1] = False
    assert image[background].max() < ms.NOISE


# The builder draws each example's answer uniformly among its type's k choices
# (``sample_question``), so among a type's n examples each answer's count is
# Binomial(n, 1/k): each count must lie within BALANCE_Z standard deviations,
# sqrt(n (1/k) (1 - 1/k)), of n/k. For a fair builder, a change of seeds or
# recipe breaks one of the 27 counts (both configs) with probability at most
# 27 * P(|N(0, 1)| > 3.5) ~ 1.3%; the counts of these seeds lie within 2.2 sd.
# The yes/no types have n = 389-484 here, where the bound is 3.5 / sqrt(n)
# <= 17.8% of n/2, so a 60/40 split (20%) fails
# (``test_the_balance_check_catches_a_60_40_skew``).
BALANCE_Z = 3.5


def balance_z_scores(counts: collections.Counter, choices) -> list[float]:
  n, p = sum(counts.values()), 1 / len(choices)
  return [(counts[c] - n * p) / np.sqrt(n * p * (1 - p)) for c in choices]


@pytest.mark.parametrize("config", CONFIGS)
def test_answers_are_balanced_within_each_question_type(config):
  by_type = collections.defaultdict(collections.Counter)
  for sample in samples(config):
    by_type[sample.question_type][sample.answer] += 1
  assert set(by_type) == set(ms.get_spec(config).question_types)
  for question_type, counts in by_type.items():
    choices = ms.answer_choices(question_type)
    assert set(counts) == set(choices), question_type
    z = balance_z_scores(counts, choices)
    assert max(map(abs, z)) < BALANCE_Z, (question_type, counts, z)


@pytest.mark.parametrize("config", CONFIGS)
def test_the_balance_check_catches_a_60_40_skew(config):
  for question_type, n in collections.Counter(
      s.question_type for s in samples(config)).items():
    if ms.answer_choices(question_type) == ms.YES_NO:
      skewed = collections.Counter(yes=round(0.6 * n), no=round(0.4 * n))
      z = balance_z_scores(skewed, ms.YES_NO)
      assert max(map(abs, z)) > BALANCE_Z, (question_type, n, z)


@pytest.mark.parametrize("config", CONFIGS)
def test_examples_are_deterministic_and_distinct(config):
  def example(split, i):
    return ms.generate_example(ms.example_rng(config, split, i), config)

  first, again = example("train", 3), example("train", 3)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert first["image"].tobytes() == again["image"].tobytes()
  assert not np.array_equal(first["image"], example("train", 4)["image"])
  assert not np.array_equal(first["image"], example("validation", 3)["image"])
  other = "relational" if config == "simple" else "simple"
  assert not np.array_equal(
      first["image"],
      ms.generate_example(ms.example_rng(other, "train", 3), other)["image"])


def test_unknown_names_fail_loudly():
  with pytest.raises(ValueError, match="Valid: simple, relational"):
    ms.sample_question(np.random.default_rng(0), "complex")
  with pytest.raises(ValueError, match="Valid: train, validation, test"):
    ms.example_rng("simple", "dev", 0)


# TFDS builds.


def assert_record_is_example(record: dict, example: dict):
  np.testing.assert_array_equal(record["image"], example["image"])
  assert record["question"].decode() == example["question"]
  assert record["caption"].decode() == example["caption"]
  assert ms.ANSWERS[record["answer"]] == example["answer"]
  assert ms.QUESTION_TYPES[record["question_type"]] == example["question_type"]
  assert record["num_objects"] == example["num_objects"]


@pytest.mark.parametrize("config", CONFIGS)
def test_tiny_build_reads_back_as_generated(config, tmp_path):
  TinyMmShapes(config=config, data_dir=tmp_path).download_and_prepare(
      file_format="array_record")
  for split, size in TinyMmShapes.SPLIT_SIZES.items():
    source = tfds.data_source(f"tiny_mm_shapes/{config}", data_dir=tmp_path,
                              split=split)
    assert len(source) == size
    for i in (0, 5, size - 1):
      expected = ms.generate_example(ms.example_rng(config, split, i), config)
      assert_record_is_example(source[i], expected)
  assert "tensorflow" not in sys.modules


def test_pipeline_builds_on_first_use_only(tmp_path, monkeypatch, capsys):
  from mmjax.data import pipeline  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(ms.MmShapes, "SPLIT_SIZES",
                      {"train": 8, "validation": 4, "test": 4})
  dataset = ml_collections.ConfigDict(dict(
      name="mm_shapes", config="relational", data_dir=str(tmp_path),
      manual_dir=""))
  pipeline.ensure_prepared(dataset)
  assert "Building dataset mm_shapes/relational into" in capsys.readouterr().out
  builder = pipeline.ensure_prepared(dataset)
  assert "Building" not in capsys.readouterr().out
  assert builder.info.splits["train"].num_examples == 8
  source = tfds.data_source("mm_shapes/relational", data_dir=tmp_path,
                            split="test")
  assert_record_is_example(
      source[3], ms.generate_example(ms.example_rng("relational", "test", 3),
                                     "relational"))
