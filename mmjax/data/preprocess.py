"""Preprocessing ops, looked up by name from a pipeline string.

A pipeline is written as in big_vision, ops joined by ``|``::

    "normalize(key='image')|random_crop(key='image', pad=2)|tokenize(key='question', max_len=16)"

Each op works on a whole host batch (a dict of numpy arrays with a leading
``[batch]`` axis) and takes a ``np.random.Generator`` that grain seeds from the
batch index, so a pipeline is deterministic and resumable. Ops are registered
in ``mmjax.registry.OPS``; an op that needs a vocabulary declares a
``vocabularies`` keyword and receives the pipeline's.
"""

from __future__ import annotations

import ast
import inspect
from typing import Any, Callable, Mapping

import numpy as np

from mmjax.data.tokenizer import Vocabulary
from mmjax.registry import OPS

Batch = dict[str, np.ndarray]
Op = Callable[[Batch, np.random.Generator], Batch]


def parse_pp(spec: str) -> list[tuple[str, dict[str, Any]]]:
  """``"a(x=1)|b"`` -> ``[("a", {"x": 1}), ("b", {})]``; checks op names."""
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
    OPS.get(call.func.id)  # Raises listing the valid op names.
    ops.append((call.func.id, kwargs))
  return ops


def build_pp(spec: str,
             vocabularies: Mapping[str, Vocabulary] | None = None, *,
             skip: tuple[str, ...] = ()) -> Op:
  """Returns one function applying every op of ``spec`` in order, but the
  ops named in ``skip``."""
  ops = []
  for name, kwargs in parse_pp(spec):
    if name in skip:
      continue
    factory = OPS.get(name)
    if "vocabularies" in inspect.signature(factory).parameters:
      kwargs = dict(kwargs, vocabularies=vocabularies or {})
    ops.append(factory(**kwargs))

  def apply(batch: Batch, rng: np.random.Generator) -> Batch:
    for op in ops:
      batch = op(batch, rng)
    return batch

  return apply


def _replace(batch: Batch, **items: np.ndarray) -> Batch:
  return {**batch, **items}


@OPS.register("normalize")
def normalize(key: str = "image", mean: float | tuple[float, ...] = 0.5,
              std: float | tuple[float, ...] = 0.25) -> Op:
  """uint8 ``[batch, ..., channels]`` -> float32 ``(x / 255 - mean) / std``."""
  mean_arr = np.asarray(mean, np.float32)
  std_arr = np.asarray(std, np.float32)

  def op(batch, rng):
    del rng
    x = batch[key].astype(np.float32) / 255.0
    return _replace(batch, **{key: (x - mean_arr) / std_arr})

  return op


@OPS.register("random_crop")
def random_crop(key: str = "image", pad: int = 2) -> Op:
  """Zero-pads ``[batch, height, width, channels]`` by ``pad`` and crops back
  to ``height x width`` at a random offset per example (translation)."""

  def op(batch, rng):
    x = batch[key]
    n, h, w = x.shape[:3]
    padded = np.pad(x, [(0, 0), (pad, pad), (pad, pad)] +
                    [(0, 0)] * (x.ndim - 3))
    dy, dx = rng.integers(0, 2 * pad + 1, size=(2, n))
    rows = dy[:, None] + np.arange(h)[None]  # [batch, height]
    cols = dx[:, None] + np.arange(w)[None]  # [batch, width]
    out = padded[np.arange(n)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return _replace(batch, **{key: out})

  return op


@OPS.register("flip_left_right")
def flip_left_right(key: str = "image") -> Op:
  """Mirrors half of the examples. Only for tasks without left/right words."""

  def op(batch, rng):
    x = batch[key]
    flip = rng.random(x.shape[0]) < 0.5
    return _replace(batch, **{key: np.where(flip[:, None, None, None],
                                            x[:, :, ::-1], x)})

  return op


@OPS.register("blur")
def blur(key: str = "image", sigma: float = 1.0) -> Op:
  """Separable Gaussian blur of ``[batch, height, width, channels]`` floats
  (a low-pass filter, e.g. to degrade the visual modality)."""
  radius = max(1, int(round(3 * sigma)))
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps = (taps / taps.sum()).astype(np.float32)

  def filter_axis(x, axis):
    padded = np.pad(x, [(radius, radius) if a == axis else (0, 0)
                        for a in range(x.ndim)], mode="edge")
    length = x.shape[axis]
    return sum(t * np.take(padded, np.arange(i, i + length), axis=axis)
               for i, t in enumerate(taps))

  def op(batch, rng):
    del rng
    x = batch[key].astype(np.float32)
    return _replace(batch, **{key: filter_axis(filter_axis(x, 1), 2)})

  return op


@OPS.register("tokenize")
def tokenize(key: str = "question", max_len: int = 16, *,
             vocabularies: Mapping[str, Vocabulary]) -> Op:
  """Text ``[batch]`` -> ids ``[batch, max_len]`` int32 and ``{key}_mask``.

  Uses the word-level vocabulary built from the train split for ``key``.
  """
  if key not in vocabularies:
    raise ValueError(f"tokenize(key={key!r}) has no vocabulary; the pipeline "
                     f"built vocabularies for: {', '.join(vocabularies) or 'none'}.")
  vocab = vocabularies[key]

  def op(batch, rng):
    del rng
    ids = vocab.encode_batch(batch[key], max_len)
    return _replace(batch, **{key: ids, f"{key}_mask": ids != vocab.pad_id})

  return op


@OPS.register("spectrogram")
def spectrogram(key: str = "audio", frame_length: int = 256,
                frame_step: int = 128) -> Op:
  """Waveform ``[batch, samples]`` -> log-magnitude spectrogram
  ``[batch, frames, frame_length // 2 + 1, 1]`` (Hann window)."""
  window = np.hanning(frame_length).astype(np.float32)

  def op(batch, rng):
    del rng
    wave = batch[key].astype(np.float32)
    frames = 1 + (wave.shape[1] - frame_length) // frame_step
    idx = (np.arange(frames)[:, None] * frame_step +
           np.arange(frame_length)[None])  # [frames, frame_length]
    magnitude = np.abs(np.fft.rfft(wave[:, idx] * window, axis=-1))
    return _replace(batch, **{key: np.log1p(magnitude)[..., None]})

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
