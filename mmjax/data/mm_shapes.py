"""``mm_shapes``: visual question answering on synthetic shapes, for TFDS.

Each example is a 32x32 RGB image of a few shapes (circle, square, triangle) in
saturated red, green, blue or yellow on a dark, lightly noisy background, with
a question about it. Neither modality suffices alone: the answers of every
question type are balanced, so the question alone scores chance, and the image
alone cannot tell which object or relation the question is about. Each example
first draws its question type and answer, then a scene that fits them.

Two configs:

* ``simple`` (default, the quickstart): 1-3 shapes. Is there a red circle? How
  many blue shapes (or circles) are there? What color is the square? What shape
  is the green object? An orderless "bag of objects" summary of the image holds
  all these need, so late fusion (concatenating pooled image and question
  vectors) can solve it.
* ``relational``: 3-6 shapes, small or large. Is A left of B? What color is the
  object nearest to A? How many shapes are left of A? Are there more X than Y?
  Is there another shape with the same color as A? An image vector pooled
  before the question is seen would have to hold every object's position bound
  to its attributes, so this config separates late fusion from fusion that lets
  the question steer the image features (FiLM, cross-attention). Compare
  accuracy per question type: the first three types need positions, the last
  two only a bag of objects.

Descriptions such as "the small red circle" or "the red shape" always fit
exactly one object, "left of" needs centres ``MIN_DX`` px apart or more, and
the nearest object leads the runner-up by ``MIN_NEAREST_GAP`` px or more.

Build and read, without TensorFlow::

  import tensorflow_datasets as tfds
  import mmjax.data.mm_shapes  # registers the builder

  builder = tfds.builder("mm_shapes/simple", data_dir=data_dir)
  builder.download_and_prepare(file_format="array_record")
  train = tfds.data_source("mm_shapes/simple", data_dir=data_dir, split="train")

(the training loop does this on first use: ``mmjax.data.pipeline.ensure_prepared``).
A subclass with a smaller
``SPLIT_SIZES`` and its own ``name`` builds a small version. Records are kept in
generation order: record ``i`` of a split is
``generate_example(example_rng(config, split, i), config)`` on any machine (for
a given numpy version).

Fields of a record:
  image: ``uint8 [32, 32, 3]``.
  question: text (bytes when read back), e.g. ``b"is there a red circle?"``.
  answer: int, index into ``ANSWERS``.
  caption: text naming every object, e.g. ``b"a red circle and two blue
    squares"`` (with sizes in ``relational``); it says nothing of positions.
  num_objects: ``int32`` scalar.
  question_type: int, index into ``QUESTION_TYPES``.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
from typing import Callable, Iterator, NamedTuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mmjax.registry import DATASETS

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle")
COLORS = ("red", "green", "blue", "yellow")
SIZES = ("small", "large")
NOISE = 27  # Each channel of each pixel gets uniform noise in [0, NOISE).
# Saturated colours, low enough that adding noise never overflows uint8.
COLOR_RGB = np.array(
    [[225, 25, 25], [25, 200, 40], [35, 65, 225], [225, 215, 25]], np.uint8)
YES_NO = ("yes", "no")
COUNTS = ("0", "1", "2", "3")
ANSWERS = (*YES_NO, *COUNTS, *COLORS, *SHAPES)
SPLITS = ("train", "validation", "test")
MIN_DX = 3  # px between centres for "left of" to hold either way.
MIN_NEAREST_GAP = 3  # px by which the nearest object beats the runner-up.
MAX_TRIES = 1000  # Scenes drawn for one question before giving up.

_VOCAB = {"shape": SHAPES, "color": COLORS, "size": SIZES}
_NUMBER_WORDS = ("a", "two", "three", "four", "five", "six")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """What differs between the configs.

  Attributes:
    seed: first entry of every example's seed, distinct per config.
    num_objects: inclusive range of the number of objects.
    radii: inclusive radius range (px) for each entry of ``SIZES``.
    mention_size: whether questions and captions use size words.
    question_types: the question types asked, drawn uniformly.
  """
  seed: int
  num_objects: tuple[int, int]
  radii: tuple[tuple[int, int], tuple[int, int]]
  mention_size: bool
  question_types: tuple[str, ...]


SPECS = {
    "simple": TaskSpec(
        seed=1, num_objects=(1, 3), radii=((4, 5), (6, 7)), mention_size=False,
        question_types=("exists", "count", "query_color", "query_shape")),
    # Large is 6 px, not 7: six objects with 15-px boxes rarely fit.
    "relational": TaskSpec(
        seed=2, num_objects=(3, 6), radii=((3, 3), (6, 6)), mention_size=True,
        question_types=("left_of", "nearest_color", "count_left", "more_than",
                        "same_color")),
}


class Scene(NamedTuple):
  """The objects of one image; each field is an int array ``[num_objects]``."""
  shape: np.ndarray  # index into SHAPES
  color: np.ndarray  # index into COLORS
  size: np.ndarray  # index into SIZES
  radius: np.ndarray  # half the side of the bounding box, px
  x: np.ndarray  # centre column
  y: np.ndarray  # centre row


class Sample(NamedTuple):
  """A scene with one question about it."""
  scene: Scene
  question_type: str
  question: str
  answer: str


# A scene and a question about it, or None when the draw failed.
Posed = tuple[Scene, str] | None
PoseFn = Callable[[np.random.Generator, TaskSpec, str], Posed]


def get_spec(config_name: str) -> TaskSpec:
  if config_name not in SPECS:
    raise ValueError(f"Unknown mm_shapes config {config_name!r}. Valid: "
                     f"{', '.join(SPECS)}.")
  return SPECS[config_name]


# Scenes.


def _randint(rng: np.random.Generator, high, size=None):
  """Uniform ints in ``[0, high)``: an int, or an array of shape ``size``.

  ``rng.random`` costs a fraction of ``rng.integers`` on draws this small, which
  adds up over 70,000 examples.
  """
  if size is None:
    return int(rng.random() * high)
  return (rng.random(size) * high).astype(int)


def _pick(rng: np.random.Generator, items):
  return items[_randint(rng, len(items))]


def _two_distinct(rng: np.random.Generator, n: int) -> tuple[int, int]:
  first = _randint(rng, n)
  return first, (first + 1 + _randint(rng, n - 1)) % n


def _num_objects(rng: np.random.Generator, spec: TaskSpec, at_least=0) -> int:
  low, high = spec.num_objects
  low = max(low, at_least)
  return low + _randint(rng, high + 1 - low)


def _random_attributes(rng: np.random.Generator,
                       n: int) -> dict[str, np.ndarray]:
  return {name: _randint(rng, len(words), n)
          for name, words in _VOCAB.items()}


def _with_count(rng: np.random.Generator, n: int, num_values: int, value: int,
                count: int) -> np.ndarray:
  """``[n]`` random values in ``[0, num_values)``, exactly ``count`` of them
  equal to ``value``."""
  values = (value + 1 + _randint(rng, num_values - 1, n)) % num_values
  values[:count] = value
  return rng.permutation(values)


def _fits(x: int, y: int, r: int, placed: list[tuple[int, int, int]]) -> bool:
  """Whether a box of half-side ``r`` at ``(x, y)`` keeps a blank pixel
  between itself and every placed ``(x, y, r)`` box."""
  return all(abs(x - px) >= r + pr + 2 or abs(y - py) >= r + pr + 2
             for px, py, pr in placed)


def _layout(rng: np.random.Generator, spec: TaskSpec,
            attributes: dict[str, np.ndarray], tries=32) -> Scene | None:
  """Places the objects, largest first, at the first of ``tries`` random
  centres that fits; None if some object does not fit.

  Bounding boxes stay inside the image; scalar Python is faster than numpy on
  these few small boxes.
  """
  size = attributes["size"]
  low, high = np.array(spec.radii)[size].T
  radius = low + _randint(rng, high - low + 1, len(size))
  u_NxTx2 = rng.random((len(size), tries, 2))
  span_Nx1x1 = (IMAGE_SIZE - 2 * radius)[:, None, None]
  candidates = (radius[:, None, None] + u_NxTx2 * span_Nx1x1).astype(int)
  candidates, radii = candidates.tolist(), radius.tolist()
  placed, centres = [], [None] * len(radii)
  for i in sorted(range(len(radii)), key=lambda i: -radii[i]):
    centres[i] = next(
        (c for c in candidates[i] if _fits(*c, radii[i], placed)), None)
    if centres[i] is None:
      return None
    placed.append((*centres[i], radii[i]))
  x, y = np.array(centres).T
  return Scene(attributes["shape"], attributes["color"], size, radius, x, y)


def _random_scene(rng: np.random.Generator, spec: TaskSpec,
                  at_least=0) -> Scene | None:
  n = _num_objects(rng, spec, at_least)
  return _layout(rng, spec, _random_attributes(rng, n))


@functools.cache
def _sprite(shape: int, radius: int) -> np.ndarray:
  """``[2 * radius + 1, 2 * radius + 1]`` bool mask of a shape, centred."""
  dy, dx = np.mgrid[-radius:radius + 1, -radius:radius + 1]
  r = radius
  masks = {
      "circle": dx**2 + dy**2 <= (r + 0.5)**2,
      "square": (np.abs(dx) <= r) & (np.abs(dy) <= r),
      # Apex at dy = -r, base along dy = r: three half-planes.
      "triangle": ((dy <= r) & (2 * dx <= dy + r + 0.5) &
                   (-2 * dx <= dy + r + 0.5)),
  }
  return masks[SHAPES[shape]]


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
  """``uint8 [32, 32, 3]`` image of the scene on a dark, noisy background."""
  image = np.zeros((IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
  fields = (scene.shape, scene.color, scene.radius, scene.x, scene.y)
  for shape, color, r, x, y in zip(*(f.tolist() for f in fields)):
    box = image[y - r:y + r + 1, x - r:x + r + 1]
    box[_sprite(shape, r)] = COLOR_RGB[color]
  image += (rng.random(image.shape, np.float32) * NOISE).astype(np.uint8)
  return image


# Language.


def _plural(attribute: str, value: int) -> str:
  """``"circles"`` or ``"red shapes"``."""
  word = _VOCAB[attribute][value]
  return f"{word}s" if attribute == "shape" else f"{word} shapes"


def _descriptions(
    scene: Scene,
    attributes=("size", "color", "shape")) -> list[list[dict[str, int]]]:
  """For each object, every description (attribute name -> value, drawn from
  ``attributes``) that fits it and no other object."""
  columns = {name: getattr(scene, name).tolist() for name in attributes}
  found = [[] for _ in range(len(scene.x))]
  for k in range(1, len(attributes) + 1):
    for subset in itertools.combinations(attributes, k):
      keys = list(zip(*(columns[name] for name in subset)))
      counts = collections.Counter(keys)
      for i, key in enumerate(keys):
        if counts[key] == 1:
          found[i].append(dict(zip(subset, key)))
  return found


def _refer(rng: np.random.Generator, descriptions: list[dict[str, int]]) -> str:
  """One of an object's descriptions in words, e.g. ``"the small circle"``."""
  chosen = _pick(rng, descriptions)
  words = [_VOCAB[name][chosen[name]] for name in ("size", "color")
           if name in chosen]
  noun = SHAPES[chosen["shape"]] if "shape" in chosen else "shape"
  return " ".join(["the", *words, noun])


def _caption(scene: Scene, mention_size: bool) -> str:
  """Names every object in a fixed attribute order, e.g. ``"two red circles
  and a blue square"``."""
  sizes = scene.size if mention_size else np.full_like(scene.size, -1)
  groups = collections.Counter(
      sorted(zip(scene.color.tolist(), scene.shape.tolist(), sizes.tolist())))
  parts = []
  for (color, shape, size), count in groups.items():
    words = [_NUMBER_WORDS[count - 1], SIZES[size] if size >= 0 else "",
             COLORS[color], SHAPES[shape] + ("s" if count > 1 else "")]
    parts.append(" ".join(w for w in words if w))
  if len(parts) == 1:
    return parts[0]
  return f"{', '.join(parts[:-1])} and {parts[-1]}"


# Question types of `simple`. Each poses a question whose answer is `answer`,
# building the scene around it, or returns None to be called again.


def _posed(rng: np.random.Generator, spec: TaskSpec,
           attributes: dict[str, np.ndarray], question: str) -> Posed:
  scene = _layout(rng, spec, attributes)
  return None if scene is None else (scene, question)


def _exists(rng: np.random.Generator, spec: TaskSpec, answer: str) -> Posed:
  attributes = _random_attributes(rng, _num_objects(rng, spec))
  present = np.zeros((len(COLORS), len(SHAPES)), bool)
  present[attributes["color"], attributes["shape"]] = True
  pairs = np.argwhere(present if answer == "yes" else ~present)
  color, shape = _pick(rng, pairs)
  return _posed(rng, spec, attributes,
                f"is there a {COLORS[color]} {SHAPES[shape]}?")


def _count(rng: np.random.Generator, spec: TaskSpec, answer: str) -> Posed:
  n = _num_objects(rng, spec, at_least=int(answer))
  attributes = _random_attributes(rng, n)
  name = _pick(rng, ("color", "shape"))
  value = _randint(rng, len(_VOCAB[name]))
  attributes[name] = _with_count(rng, n, len(_VOCAB[name]), value, int(answer))
  return _posed(rng, spec, attributes,
                f"how many {_plural(name, value)} are there?")


def _query_color(rng: np.random.Generator, spec: TaskSpec,
                 answer: str) -> Posed:
  n = _num_objects(rng, spec)
  attributes = _random_attributes(rng, n)
  shape = _randint(rng, len(SHAPES))
  attributes["shape"] = _with_count(rng, n, len(SHAPES), shape, 1)
  attributes["color"][attributes["shape"] == shape] = COLORS.index(answer)
  return _posed(rng, spec, attributes, f"what color is the {SHAPES[shape]}?")


def _query_shape(rng: np.random.Generator, spec: TaskSpec,
                 answer: str) -> Posed:
  n = _num_objects(rng, spec)
  attributes = _random_attributes(rng, n)
  color = _randint(rng, len(COLORS))
  attributes["color"] = _with_count(rng, n, len(COLORS), color, 1)
  attributes["shape"][attributes["color"] == color] = SHAPES.index(answer)
  return _posed(rng, spec, attributes,
                f"what shape is the {COLORS[color]} object?")


# Question types of `relational`. The object a question is about is drawn from
# those that some description picks out. Descriptions of an object whose
# colour matters leave colour out, so the question does not rule answers out.


def _left_of(rng: np.random.Generator, spec: TaskSpec, answer: str) -> Posed:
  scene = _random_scene(rng, spec)
  if scene is None:
    return None
  refs = _descriptions(scene)
  referable = [i for i, found in enumerate(refs) if found]
  if len(referable) < 2:
    return None
  a, b = (referable[i] for i in _two_distinct(rng, len(referable)))
  if abs(scene.x[a] - scene.x[b]) < MIN_DX:
    return None
  if (scene.x[a] < scene.x[b]) != (answer == "yes"):
    a, b = b, a
  return scene, f"is {_refer(rng, refs[a])} left of {_refer(rng, refs[b])}?"


def _nearest_color(rng: np.random.Generator, spec: TaskSpec,
                   answer: str) -> Posed:
  scene = _random_scene(rng, spec)
  if scene is None:
    return None
  refs = _descriptions(scene, ("size", "shape"))
  distance_NxN = np.hypot(scene.x[:, None] - scene.x,
                          scene.y[:, None] - scene.y)
  np.fill_diagonal(distance_NxN, np.inf)
  nearest_two = np.sort(distance_NxN, axis=1)[:, :2]
  clear = nearest_two[:, 1] - nearest_two[:, 0] >= MIN_NEAREST_GAP
  candidates = [i for i, found in enumerate(refs) if found and clear[i]]
  if not candidates:
    return None
  a = _pick(rng, candidates)
  color = scene.color.copy()
  color[distance_NxN[a].argmin()] = COLORS.index(answer)
  return (scene._replace(color=color),
          f"what color is the object nearest to {_refer(rng, refs[a])}?")


def _count_left(rng: np.random.Generator, spec: TaskSpec,
                answer: str) -> Posed:
  scene = _random_scene(rng, spec, at_least=int(answer) + 1)
  if scene is None:
    return None
  refs = _descriptions(scene)
  dx_NxN = scene.x[None, :] - scene.x[:, None]
  clear = np.all((np.abs(dx_NxN) >= MIN_DX) | np.eye(len(scene.x), dtype=bool),
                 axis=1)
  num_left = np.sum(dx_NxN < 0, axis=1)
  candidates = [i for i, found in enumerate(refs)
                if found and clear[i] and num_left[i] == int(answer)]
  if not candidates:
    return None
  target = _refer(rng, refs[_pick(rng, candidates)])
  return scene, f"how many shapes are left of {target}?"


def _more_than(rng: np.random.Generator, spec: TaskSpec, answer: str) -> Posed:
  scene = _random_scene(rng, spec)
  if scene is None:
    return None
  name = _pick(rng, ("shape", "color"))
  counts = np.bincount(getattr(scene, name), minlength=len(_VOCAB[name]))
  u, v = _two_distinct(rng, len(_VOCAB[name]))
  if counts[u] == counts[v]:
    return None
  if (counts[u] > counts[v]) != (answer == "yes"):
    u, v = v, u
  return scene, f"are there more {_plural(name, u)} than {_plural(name, v)}?"


def _same_color(rng: np.random.Generator, spec: TaskSpec,
                answer: str) -> Posed:
  scene = _random_scene(rng, spec)
  if scene is None:
    return None
  refs = _descriptions(scene, ("size", "shape"))
  candidates = [i for i, found in enumerate(refs) if found]
  if not candidates:
    return None
  a = _pick(rng, candidates)
  others = np.flatnonzero(np.arange(len(scene.x)) != a)
  color = scene.color.copy()
  same = others[color[others] == color[a]]
  if answer == "yes" and not same.size:
    color[_pick(rng, others)] = color[a]
  if answer == "no":
    color[same] = (color[a] + 1 + _randint(rng, len(COLORS) - 1, same.size)
                   ) % len(COLORS)
  target = _refer(rng, refs[a])
  return (scene._replace(color=color),
          f"is there another shape with the same color as {target}?")


# Question type -> (its possible answers, the function that poses it).
_QUESTIONS: dict[str, tuple[tuple[str, ...], PoseFn]] = {
    "exists": (YES_NO, _exists),
    "count": (COUNTS, _count),
    "query_color": (COLORS, _query_color),
    "query_shape": (SHAPES, _query_shape),
    "left_of": (YES_NO, _left_of),
    "nearest_color": (COLORS, _nearest_color),
    "count_left": (COUNTS, _count_left),
    "more_than": (YES_NO, _more_than),
    "same_color": (YES_NO, _same_color),
}
QUESTION_TYPES = tuple(_QUESTIONS)


def answer_choices(question_type: str) -> tuple[str, ...]:
  """The answers a question type can have, each equally likely."""
  return _QUESTIONS[question_type][0]


# Examples.


def sample_question(rng: np.random.Generator, config_name: str) -> Sample:
  """Draws a question type and its answer, then a scene and question that fit.

  Drawing the answer first keeps answers uniform within each type.
  """
  spec = get_spec(config_name)
  question_type = _pick(rng, spec.question_types)
  answers, pose = _QUESTIONS[question_type]
  answer = _pick(rng, answers)
  for _ in range(MAX_TRIES):
    posed = pose(rng, spec, answer)
    if posed is not None:
      return Sample(posed[0], question_type, posed[1], answer)
  raise RuntimeError(f"No {config_name} scene for a {question_type!r} question "
                     f"with answer {answer!r} in {MAX_TRIES} tries.")


def generate_example(rng: np.random.Generator, config_name: str) -> dict:
  """One example as ``_generate_examples`` yields it (labels as strings)."""
  sample = sample_question(rng, config_name)
  return {
      "image": render(sample.scene, rng),
      "question": sample.question,
      "answer": sample.answer,
      "caption": _caption(sample.scene, get_spec(config_name).mention_size),
      "num_objects": np.int32(len(sample.scene.x)),
      "question_type": sample.question_type,
  }


def example_rng(config_name: str, split: str,
                index: int) -> np.random.Generator:
  """The generator that example ``index`` of ``split`` is drawn from."""
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}. Valid: {', '.join(SPLITS)}.")
  return np.random.default_rng(
      [get_spec(config_name).seed, SPLITS.index(split), index])


def generate_split(config_name: str, split: str,
                   num_examples: int) -> Iterator[tuple[int, dict]]:
  """Yields ``(index, example)`` for examples ``0 .. num_examples - 1``."""
  for index in range(num_examples):
    yield index, generate_example(example_rng(config_name, split, index),
                                  config_name)


# TFDS.


@DATASETS.register("mm_shapes")
class MmShapes(tfds.core.GeneratorBasedBuilder):
  """The ``mm_shapes`` dataset; override ``SPLIT_SIZES`` for a smaller build."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(
          name="simple",
          description="1-3 shapes; existence, count and attribute questions."),
      tfds.core.BuilderConfig(
          name="relational",
          description="3-6 shapes in two sizes; questions about relations."),
  ]
  SPLIT_SIZES = {"train": 60_000, "validation": 5_000, "test": 5_000}
  # TFDS finds this file through the `importlib_resources` backport, which it
  # needs but does not require on Python >= 3.9 (tensorflow/datasets#11212).
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    image_shape = (IMAGE_SIZE, IMAGE_SIZE, 3)
    return tfds.core.DatasetInfo(
        builder=self,
        description="Visual question answering on synthetic coloured shapes.",
        features=tfds.features.FeaturesDict({
            # Stored as raw bytes: as a list of ints it writes 5x slower.
            "image": tfds.features.Tensor(
                shape=image_shape, dtype=np.uint8,
                encoding=tfds.features.Encoding.BYTES),
            "question": tfds.features.Text(),
            "answer": tfds.features.ClassLabel(names=ANSWERS),
            "caption": tfds.features.Text(),
            "num_objects": tfds.features.Scalar(dtype=np.int32),
            "question_type": tfds.features.ClassLabel(names=QUESTION_TYPES),
        }),
        # Keep records in index order, so record i is example i.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    return {split: self._generate_examples(split, num_examples)
            for split, num_examples in self.SPLIT_SIZES.items()}

  def _generate_examples(self, split: str,
                         num_examples: int) -> Iterator[tuple[int, dict]]:
    return generate_split(self.builder_config.name, split, num_examples)
