"""A word-level vocabulary built from a dataset's train split."""

from __future__ import annotations

import collections
import json
import os
import re
from typing import Iterable

import numpy as np

_WORD = re.compile(r"[a-z0-9]+")


def split_words(text: str | bytes) -> list[str]:
  """Lower-cases and splits on anything that is not a letter or digit."""
  if isinstance(text, bytes):
    text = text.decode("utf-8")
  return _WORD.findall(text.lower())


class Vocabulary:
  """Maps words to ids: 0 is padding, 1 unknown, then words by frequency."""

  pad_id = 0
  unk_id = 1

  def __init__(self, words: list[str]):
    self.words = list(words)
    self._ids = {w: i + 2 for i, w in enumerate(self.words)}

  @classmethod
  def from_texts(cls, texts: Iterable[str | bytes]) -> "Vocabulary":
    counts = collections.Counter(w for t in texts for w in split_words(t))
    return cls([w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))])

  @property
  def size(self) -> int:
    return len(self.words) + 2

  def encode(self, text: str | bytes, max_len: int) -> np.ndarray:
    """Text -> ``[max_len]`` int32 ids, truncated or padded with 0."""
    ids = [self._ids.get(w, self.unk_id) for w in split_words(text)][:max_len]
    return np.pad(np.asarray(ids, np.int32), (0, max_len - len(ids)))

  def encode_batch(self, texts: np.ndarray, max_len: int) -> np.ndarray:
    """``[batch]`` texts -> ``[batch, max_len]`` int32 ids."""
    return np.stack([self.encode(t, max_len) for t in texts])

  def save(self, path: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(self.words, f)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> "Vocabulary":
    with open(path) as f:
      return cls(json.load(f))
