"""Named parts: encoders, fusion blocks, heads, preprocessing ops, datasets,
optimizers and learning-rate schedules.

Each kind of part lives in one plain registry. Parts register themselves with a
decorator where they are defined, and everything else looks them up by the name
an experiment file uses::

    @ENCODERS.register("cnn")
    class ConvEncoder(nn.Module): ...

    ENCODERS.get("cnn")  # -> ConvEncoder

An unknown name raises a ``ValueError`` that lists the valid names.
``register_all()`` imports every module that registers parts, so that the
registries are complete before a config is checked or a model built;
``register_datasets()`` imports the TFDS builders of ``DATASETS``, which the
input pipeline needs and a config check or a model does not.
"""

from __future__ import annotations

import importlib
from typing import Any, Callable, TypeVar

T = TypeVar("T")


class Registry:
  """A name -> object mapping for one kind of part."""

  def __init__(self, kind: str, *, also_valid: str = ""):
    """``also_valid``: what else the unknown-name error should say is valid
    (names that work without being registered here)."""
    self.kind = kind
    self.also_valid = also_valid
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
      raise self.unknown_name_error(name)
    return self._entries[name]

  def unknown_name_error(self, name: str) -> ValueError:
    """The error for ``name``, listing the valid names."""
    return ValueError(
        f"Unknown {self.kind} {name!r}. Valid {self.kind} names: "
        f"{', '.join(self.names())}." +
        (f" {self.also_valid}" if self.also_valid else ""))

  def names(self) -> list[str]:
    return sorted(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries


ENCODERS = Registry("encoder")
FUSIONS = Registry("fusion")
HEADS = Registry("head")
OPS = Registry("preprocessing op")
# TFDS builder classes that mmjax defines (``config.dataset.name``).
DATASETS = Registry("dataset", also_valid=(
    "Any other TFDS dataset works too, once its builder is registered with "
    "TFDS (imported) before training."))
OPTIMIZERS = Registry("optimizer")
SCHEDULES = Registry("schedule")


# The packages and modules whose import registers parts.
PART_MODULES = ("mmjax.encoders", "mmjax.fusion", "mmjax.heads",
                "mmjax.data.preprocess", "mmjax.optim")
# The modules whose import registers datasets. Not in ``PART_MODULES``: they
# import tensorflow_datasets, which config checks and model builds do not
# need; on one core of the 2-core CPU machine it adds 0.8 s to
# ``register_all``'s 3.8 s (a fresh process, median of 3).
DATASET_MODULES = ("mmjax.data.avmnist", "mmjax.data.mm_shapes")


def register_all() -> None:
  """Imports every module of ``PART_MODULES`` (once; later calls are free)."""
  _import_all(PART_MODULES)


def register_datasets() -> None:
  """Imports every module of ``DATASET_MODULES`` (once; later calls are
  free)."""
  _import_all(DATASET_MODULES)


def _import_all(modules: tuple[str, ...]) -> None:
  for module in modules:
    importlib.import_module(module)
