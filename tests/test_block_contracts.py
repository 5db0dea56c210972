"""The block contracts (``mmjax/encoders/base.py``, ``mmjax/fusion/base.py``):
the tables of registered blocks in the packages' docstrings."""

from __future__ import annotations

import re

import pytest

import mmjax.encoders  # Registers the encoders.
import mmjax.fusion  # Registers the fusion blocks.
from mmjax.encoders.base import Encoder
from mmjax.fusion.base import Fusion
from mmjax.registry import ENCODERS, FUSIONS


def _table(package) -> dict[str, tuple[str, str]]:
  """name -> (file, class) from the table in ``package``'s docstring: after
  its header line ``  name  class  paper``, a line ``  <file>.py:`` starts
  each file's rows ``  <name>  <class>  <paper>``; a blank line ends it."""
  rows, file, in_table = {}, None, False
  for line in package.__doc__.splitlines():
    if re.fullmatch(r"  name +class +paper", line):
      in_table = True
    elif in_table and not line.strip():
      break
    elif in_table and (match := re.fullmatch(r"  (\w+\.py):", line)):
      file = match.group(1)
    elif in_table:
      match = re.fullmatch(r"  (\w+) +(\w+) +\S.*", line)
      assert match and file, f"not a row of the table: {line!r}"
      assert match.group(1) not in rows, f"{match.group(1)} listed twice"
      rows[match.group(1)] = (file, match.group(2))
  return rows


@pytest.mark.parametrize("package,registry,base", [
    (mmjax.encoders, ENCODERS, Encoder), (mmjax.fusion, FUSIONS, Fusion)])
def test_package_table_lists_exactly_the_registered_blocks(package, registry,
                                                           base):
  table = _table(package)
  assert sorted(table) == registry.names()
  for name, (file, class_name) in table.items():
    cls = registry.get(name)
    where = f"{package.__name__}.{file.removesuffix('.py')}"
    assert (cls.__module__, cls.__name__) == (where, class_name), name
    assert issubclass(cls, base), name
