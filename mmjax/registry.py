"""Named parts: encoders, fusion blocks, heads, preprocessing ops, optimizers
and learning-rate schedules.

Each kind of part lives in one plain registry. Parts register themselves with a
decorator where they are defined, and everything else looks them up by the name
an experiment file uses::

    @ENCODERS.register("cnn")
    class ConvEncoder(nn.Module): ...

    ENCODERS.get("cnn")  # -> ConvEncoder

An unknown name raises a ``ValueError`` that lists the valid names.
``register_all()`` imports every module that registers parts, so that the
registries are complete before a config is checked or a model built.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class Registry:
  """A name -> object mapping for one kind of part."""

  def __init__(self, kind: str):
    self.kind = kind
    self._entries: dict[str, Any] = {}

  def register(self, name: str) -> Callable[[T], T]:
    """Decorator that registers ``obj`` under ``name``."""

    def decorator(obj: T) -> T:
      if name in self._entries:
        raise ValueError(f"{self.kind} {name!r} is registered twice.")
      self._entries[name] = obj
      return obj

    return decorator

  def get(self, name: str) -> Any:
    if name not in self._entries:
      raise ValueError(
          f"Unknown {self.kind} {name!r}. Valid {self.kind} names: "
          f"{', '.join(self.names())}.")
    return self._entries[name]

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries


ENCODERS = Registry("encoder")
FUSIONS = Registry("fusion")
HEADS = Registry("head")
OPS = Registry("preprocessing op")
OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


# The packages and modules whose import registers parts.
PART_MODULES = ("mmjax.encoders", "mmjax.fusion", "mmjax.heads",
                "mmjax.data.preprocess", "mmjax.optim")


def register_all() -> None:
  """Imports every module of ``PART_MODULES`` (once; later calls are free)."""
  for module in PART_MODULES:
    importlib.import_module(module)
