"""Preprocessing ops, looked up by name from a pipeline string.

A pipeline is written as in big_vision, ops joined by ``|``::

    "normalize(key='image')|random_crop(key='image', pad=2)|tokenize(key='question', max_len=16)"

``parse_pp`` reads the string into ops, checking names and arguments (a run
parses each string once: ``pipeline.Preprocessing``); ``build_pp`` makes the
parsed ops one function. Each op works on a whole host batch (a dict of numpy
arrays with a leading ``[batch]`` axis) and takes a ``np.random.Generator``
that grain seeds from the batch index, so a pipeline is deterministic and
resumable. Ops are registered in ``mmjax.registry.OPS``; an op that needs a
vocabulary declares a ``vocabularies`` keyword and receives the pipeline's.

Most ops transform one field. They are written on one array and made ops by
``field_op`` (as big_vision's ``InKeyOutKey``), which adds their ``key``, the
field read, and ``out_key``, the field written (default: ``key``). No op
defaults its ``key``: the pipeline string names every field it reads.
"""

from __future__ import annotations

import ast
import functools
import inspect
from typing import Any, Callable, Mapping, NamedTuple, Sequence

import numpy as np

from mmjax.data.tokenizer import Vocabulary
from mmjax.registry import OPS

Batch = dict[str, np.ndarray]
Op = Callable[[Batch, np.random.Generator], Batch]
# What a ``field_op`` factory returns: ``(x, rng) -> new x`` on one field.
FieldFn = Callable[[np.ndarray, np.random.Generator], np.ndarray]


class ParsedOp(NamedTuple):
  """One op of a pipeline string: ``name(**kwargs)``."""
  name: str
  kwargs: dict[str, Any]


def parse_pp(spec: str) -> list[ParsedOp]:
  """``"a(x=1)|b"`` -> ``[("a", {"x": 1}), ("b", {})]``. Checks the op
  names, and that each op takes the arguments given and is given those it
  needs (e.g. ``key``)."""
  ops = []
  for text in filter(None, (s.strip() for s in spec.split("|"))):
    try:
      call = ast.parse(text if "(" in text else text + "()", mode="eval").body
      if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name):
        raise SyntaxError(text)
      if call.args:
        raise SyntaxError("positional arguments are not allowed")
      kwargs = {kw.arg: ast.literal_eval(kw.value) for kw in call.keywords}
    except (SyntaxError, ValueError) as e:
      raise ValueError(f"Cannot parse preprocessing op {text!r} ({e}); write "
                       "ops as name(key=value, ...) joined by '|'.") from None
    _check_arguments(text, call.func.id, kwargs)
    ops.append(ParsedOp(call.func.id, kwargs))
  return ops


def _check_arguments(text: str, name: str, kwargs: dict[str, Any]) -> None:
  factory = OPS.get(name)  # Raises listing the valid op names.
  signature = inspect.signature(factory)
  from_pipeline = _pipeline_arguments(factory, {})
  try:
    signature.bind(**{**kwargs, **from_pipeline})
  except TypeError as e:
    arguments = [p for p in signature.parameters if p not in from_pipeline]
    raise ValueError(f"Preprocessing op {text!r}: {e}. {name} takes: "
                     f"{', '.join(arguments) or 'no arguments'}.") from None


def _pipeline_arguments(factory: Callable[..., Op],
                        vocabularies: Mapping[str, Vocabulary]
                        ) -> dict[str, Any]:
  """What the pipeline, not its string, passes ``factory``: the
  vocabularies, if it declares them."""
  if "vocabularies" in inspect.signature(factory).parameters:
    return {"vocabularies": vocabularies}
  return {}


def build_pp(ops: Sequence[ParsedOp],
             vocabularies: Mapping[str, Vocabulary] | None = None, *,
             skip: tuple[str, ...] = ()) -> Op:
  """Returns one function applying every op of ``ops`` (``parse_pp``'s) in
  order, but the ops named in ``skip``."""
  functions = []
  for name, kwargs in ops:
    if name in skip:
      continue
    factory = OPS.get(name)
    functions.append(factory(
        **{**kwargs, **_pipeline_arguments(factory, vocabularies or {})}))

  def apply(batch: Batch, rng: np.random.Generator) -> Batch:
    for op in functions:
      batch = op(batch, rng)
    return batch

  return apply


def text_keys(ops: Sequence[ParsedOp]) -> list[str]:
  """The fields that ``tokenize`` ops of ``ops`` read (each needs a
  vocabulary), in order, once each."""
  keys = []
  for name, kwargs in ops:
    if name == "tokenize" and kwargs["key"] not in keys:
      keys.append(kwargs["key"])
  return keys


def field_op(factory: Callable[..., FieldFn]) -> Callable[..., Op]:
  """Makes ``factory``, which returns a function of one array, an op on
  one field of the batch.

  ``factory(**kwargs)`` returns ``fn(x, rng) -> y``. The decorated
  ``factory(key, out_key=None, **kwargs)`` returns an op that writes
  ``fn(batch[key], rng)`` to ``batch[out_key]`` (a new field, ``key`` left as
  it was) or, without ``out_key``, back to ``batch[key]``; every other field
  passes through.
  """

  @functools.wraps(factory)
  def make_op(key: str, *, out_key: str | None = None, **kwargs) -> Op:
    fn = factory(**kwargs)

    def op(batch: Batch, rng: np.random.Generator) -> Batch:
      return {**batch, out_key or key: fn(batch[key], rng)}

    return op

  # What parse_pp checks a pipeline string's arguments against.
  keys = [inspect.Parameter("key", inspect.Parameter.POSITIONAL_OR_KEYWORD),
          inspect.Parameter("out_key", inspect.Parameter.KEYWORD_ONLY,
                            default=None)]
  make_op.__signature__ = inspect.Signature(keys + [
      p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
      for p in inspect.signature(factory).parameters.values()])
  return make_op


@OPS.register("normalize")
@field_op
def normalize(mean: float | tuple[float, ...] = 0.5,
              std: float | tuple[float, ...] = 0.25) -> FieldFn:
  """uint8 ``[batch, ..., channels]`` -> float32 ``(x / 255 - mean) / std``
  (``mean``, ``std``: one value, or one per channel)."""
  mean_arr = np.asarray(mean, np.float32)
  std_arr = np.asarray(std, np.float32)

  def fn(x, rng):
    del rng
    return (x.astype(np.float32) / 255.0 - mean_arr) / std_arr

  return fn


@OPS.register("random_crop")
@field_op
def random_crop(pad: int = 2) -> FieldFn:
  """Zero-pads ``[batch, height, width, channels]`` by ``pad`` and crops back
  to ``height x width`` at a random offset per example (translation)."""

  def fn(x_BxHxWxC, rng):
    n, h, w = x_BxHxWxC.shape[:3]
    padded = np.pad(x_BxHxWxC, [(0, 0), (pad, pad), (pad, pad)] +
                    [(0, 0)] * (x_BxHxWxC.ndim - 3))
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None]  # [batch, height]
    cols = dx[:, None] + np.arange(w)[None]  # [batch, width]
    return padded[np.arange(n)[:, None, None], rows[:, :, None],
                  cols[:, None, :]]

  return fn


@OPS.register("flip_left_right")
@field_op
def flip_left_right() -> FieldFn:
  """Mirrors half of the examples of ``[batch, height, width, channels]``.
  Only for tasks without left/right words."""

  def fn(x_BxHxWxC, rng):
    flip = rng.random(x_BxHxWxC.shape[0]) < 0.5
    return np.where(flip[:, None, None, None], x_BxHxWxC[:, :, ::-1],
                    x_BxHxWxC)

  return fn


@OPS.register("blur")
@field_op
def blur(sigma: float = 1.0) -> FieldFn:
  """Separable Gaussian blur of ``[batch, height, width, channels]``, as
  float32 (a low-pass filter, e.g. to degrade the visual modality)."""
  radius = max(1, int(round(3 * sigma)))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = (taps / taps.sum()).astype(np.float32)

  def filter_axis(x, axis):
    padded = np.pad(x, [(radius, radius) if a == axis else (0, 0)
                        for a in range(x.ndim)], mode="edge")
    length = x.shape[axis]
    return sum(t * np.take(padded, np.arange(i, i + length), axis=axis)
               for i, t in enumerate(taps))

  def fn(x_BxHxWxC, rng):
    del rng
    return filter_axis(filter_axis(x_BxHxWxC.astype(np.float32), 1), 2)

  return fn


@OPS.register("spectrogram")
@field_op
def spectrogram(frame_length: int = 256, frame_step: int = 128) -> FieldFn:
  """Waveform ``[batch, samples]`` -> log-magnitude spectrogram
  ``[batch, frames, frame_length // 2 + 1, 1]`` float32 (Hann window)."""
  window = np.hanning(frame_length).astype(np.float32)

  def fn(wave_BxS, rng):
    del rng
    wave_BxS = wave_BxS.astype(np.float32)
    frames = 1 + (wave_BxS.shape[1] - frame_length) // frame_step
    idx = (np.arange(frames)[:, None] * frame_step +
           np.arange(frame_length)[None])  # [frames, frame_length]
    magnitude = np.abs(np.fft.rfft(wave_BxS[:, idx] * window, axis=-1))
    return np.log1p(magnitude)[..., None]

  return fn


# Not a field_op: it writes the field's padding mask too, and it replaces
# the text in place (no ``out_key``), since the vocabulary, the model's
# encoder and ``{key}_mask`` are all named after the field.
@OPS.register("tokenize")
def tokenize(key: str, max_len: int = 16, *,
             vocabularies: Mapping[str, Vocabulary]) -> Op:
  """Text ``[batch]`` -> ids ``[batch, max_len]`` int32 in ``key``, and
  ``{key}_mask`` ``[batch, max_len]`` bool, True on words (not padding).

  Uses the word-level vocabulary built from the train split for ``key``.
  """
  if key not in vocabularies:
    raise ValueError(f"tokenize(key={key!r}) has no vocabulary; the pipeline "
                     f"built vocabularies for: {', '.join(vocabularies) or 'none'}.")
  vocab = vocabularies[key]

  def op(batch, rng):
    del rng
    ids = vocab.encode_batch(batch[key], max_len)
    return {**batch, key: ids, f"{key}_mask": ids != vocab.pad_id}

  return op


@OPS.register("keep")
def keep(keys: tuple[str, ...] = ()) -> Op:
  """Drops every field but ``keys`` (the model's inputs and targets)."""

  def op(batch, rng):
    del rng
    missing = [k for k in keys if k not in batch]
    if missing:
      raise KeyError(f"keep: fields {missing} are not in the batch "
                     f"(present: {', '.join(sorted(batch))}).")
    return {k: batch[k] for k in keys}

  return op
