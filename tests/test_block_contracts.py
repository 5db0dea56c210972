"""The block contracts (``mmjax/encoders/base.py``, ``mmjax/fusion/base.py``):
the tables of registered blocks in the packages' docstrings, the modalities a
fusion block reads as tokens only, and encoders' pooled projections.

The models that ``build_model`` assembles from these declarations are tested
in ``test_models.py``.
"""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest

import mmjax.encoders  # Registers the encoders.
import mmjax.fusion  # Registers the fusion blocks.
from mmjax.encoders.base import Encoder, Encoding
from mmjax.fusion.base import Fusion
from mmjax.fusion.film import FiLMFusion
from mmjax.registry import ENCODERS, FUSIONS
from mmjax.transformer import masked_mean

import block_cases
from helpers import init_module


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


def _perturb_pooled(encodings: dict[str, Encoding],
                    modality: str) -> dict[str, Encoding]:
  enc = encodings[modality]
  return {**encodings, modality: enc.replace(pooled=enc.pooled * 3. + 1.)}


@pytest.mark.parametrize("name", FUSIONS.names())
def test_token_modalities_are_the_modalities_whose_pooled_is_never_read(name):
  """A fusion block's output depends on a modality's ``pooled`` exactly
  when the block does not declare that modality token-only: a wrong
  declaration would make ``build_model`` drop a pooled projection the block
  reads, and a missing one would leave one untrained."""
  make_module, make_inputs = block_cases.CASES[name]
  fusion = make_module(None)
  (encodings,) = make_inputs()
  token_only = fusion.token_modalities(tuple(encodings))
  assert token_only <= set(encodings)
  variables = init_module(fusion, encodings)
  apply = jax.jit(lambda e: fusion.apply(variables, e, train=False))
  out = jax.tree.leaves(apply(encodings))
  for modality in encodings:
    perturbed = jax.tree.leaves(apply(_perturb_pooled(encodings, modality)))
    unchanged = all(np.array_equal(x, y) for x, y in zip(out, perturbed))
    assert unchanged == (modality in token_only), (modality, token_only)


def test_film_reads_its_target_as_tokens_only():
  film = FiLMFusion(target="audio")
  assert film.token_modalities(("audio", "image")) == {"audio"}
  assert film.token_modalities(("image", "question")) == set()


@pytest.mark.parametrize("name", ENCODERS.names())
def test_pooled_projection_switches_off_to_a_parameter_free_pooling(name):
  """Without its pooled projection an encoder has the same parameters less
  the projection's, the same tokens, and ``pooled`` the mean of its tokens
  over positions (real ones)."""
  make_module, make_inputs = block_cases.CASES[name]
  encoder = make_module(None)
  without = encoder.without_pooled_projection()
  if encoder.pooled_projection is None:
    assert without is encoder
    return
  assert getattr(encoder, encoder.pooled_projection) > 0
  assert getattr(without, encoder.pooled_projection) == 0
  inputs = make_inputs()
  full, bare = init_module(encoder, *inputs), init_module(without, *inputs)
  shapes_full, shapes_bare = (
      {jax.tree_util.keystr(p): x.shape
       for p, x in jax.tree_util.tree_leaves_with_path(v["params"])}
      for v in (full, bare))
  assert shapes_bare.items() < shapes_full.items()
  out_full = encoder.apply(full, *inputs, train=False)
  out = without.apply(bare, *inputs, train=False)
  np.testing.assert_array_equal(out.tokens, out_full.tokens)
  if out.tokens.ndim == 4:
    np.testing.assert_allclose(out.pooled, out.tokens.mean(axis=(1, 2)),
                               rtol=1e-6, atol=1e-6)
  else:
    np.testing.assert_allclose(out.pooled, masked_mean(out.tokens, out.mask),
                               rtol=1e-6, atol=1e-6)
