"""Accuracy with missing and noisy modalities, and MultiBench's robustness.

    python -m mmjax.evaluate --workdir=RUN --robustness \
        [--robustness_reference=LATE_FUSION_RUN]

adds ``"robustness"`` to the run's ``evaluation.json`` (the mean over its
seeds; each seed's in ``per_seed``), on the test split (or the first of
``--splits``), and draws ``robustness_noise.png`` and
``robustness_subsets.png`` in the workdir::

    {"split": "test",
     "subsets": {"image+question": {"zeros": acc, "mean": acc, "masked": acc},
                 "image": {"zeros": acc, "masked": acc}, ...},
     "noise": {"image" | "question" | "all": {
         "levels": [0.0, 0.1, ..., 1.0], "accuracy": [...],
         "relative_robustness": x, "effective_robustness": y or null}}}

Missing modalities: the accuracy for every non-empty subset of the model's
modalities kept (named ``"a+b"``, in the model's order), each other
modality replaced in one of three ways (a subset lists the ways that apply
to all its missing modalities; the full set, missing nothing, all of them):

  zeros   the input zeroed; token ids become the padding id 0 but the
          ``<modality>_mask`` is kept, so the model still sees the length.
  mean    the input replaced by the train set's mean input (elementwise),
          float inputs only: a mean of token ids is no token.
  masked  the ``<modality>_mask`` set all False, the input kept; only for
          modalities with a mask. It is an empty sequence to every mmjax
          block: the text encoders' pooled vectors and masked means are 0,
          FiLM's masked max-pool gives 0, and an attention whose keys are
          all masked (MulT's cross-attention to that modality) attends
          uniformly over the zeroed padding, a finite value independent of
          the input. MBT and the multimodal transformer keep a real CLS.

A run trained with ``config.model.modality_dropout`` saw a dropped image as
``zeros`` and a dropped text as ids 0 with the mask all False, which is
``masked`` to its text encoder (whose pooled output ignores the ids at
masked positions).

Noise: the accuracy as noise on one modality, or on all together, grows
through ``LEVELS`` (0, 0.1, ..., 1). Images and spectrograms get Gaussian
noise of standard deviation ``level * std``, ``std`` the modality's train-set
standard deviation (over all elements); token ids are replaced, each real
token with probability ``level``, by a word id drawn uniformly from the
vocabulary (never padding, 0, nor unknown, 1). The noise is deterministic:
its rng is fixed by the level, the batch and the modality (so a modality
gets the same noise alone and in "all").

The train-set statistics (mean, std) are of the evaluation preprocessing's
output over a fixed random sample of ``STATISTICS_EXAMPLES`` (2,000) train
examples, not the whole split.

Every accuracy comes from one compiled function, ``corrupted_eval_step``:
which modalities are kept, how they are replaced and the noise level are
traced arguments, so the whole table compiles once.

Metrics, as MultiBench defines them (Liang et al. 2021, arXiv:2107.07502;
``eval_scripts/robustness.py`` of github.com/pliang279/MultiBench):
``relative_robustness`` is the area under the accuracy-vs-level curve
(trapezoids; MultiBench's ``relative_robustness_helper`` sums
``(a_i + a_{i+1}) * 0.1 / 2`` over its 11 levels 0..1, which this equals);
``effective_robustness`` is ``sum_i (a_i - (r_i + a_0 - r_0))``, the accuracy
above the reference curve ``r`` (late fusion's in MultiBench) shifted to the
same clean accuracy, summed over the levels (``effective_robustness_helper``;
a sum, not an area). MultiBench then min-max normalises each over the
methods it compares (``maxmin_normalize``): a single run has no such set,
so the values here are raw; ``minmax_normalize`` does it over several runs
(``mmjax.sweep --robustness``).
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import os
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax import losses
from mmjax import metrics as metrics_lib
from mmjax import steps
from mmjax.data import pipeline
from mmjax.data import preprocess
from mmjax.data.tokenizer import Vocabulary

LEVELS = tuple(i / 10 for i in range(11))
FILLS = ("zeros", "mean", "masked")
MEAN, MASKED = FILLS.index("mean"), FILLS.index("masked")
STATISTICS_EXAMPLES = 2000
# Token ids a replacement may draw: the words, not padding or unknown.
FIRST_WORD_ID = max(Vocabulary.pad_id, Vocabulary.unk_id) + 1


@dataclasses.dataclass(frozen=True, eq=False)
class ModalityInput:
  """What corrupting one modality needs.

  Attributes:
    name: the modality (its batch key).
    has_mask: the batch holds ``<name>_mask``.
    vocab_size: for token ids, the vocabulary size; 0 for float inputs.
    mean: float inputs: the train-set mean input ``[...]`` (one example's
      shape).
    std: float inputs: the train-set standard deviation over all elements.
  """
  name: str
  has_mask: bool
  vocab_size: int = 0
  mean: np.ndarray | None = None
  std: float = 0.0

  @property
  def fills(self) -> tuple[str, ...]:
    """The replacements that apply to this modality."""
    return tuple(f for f, ok in zip(FILLS, (True, not self.vocab_size,
                                            self.has_mask)) if ok)


class Condition(NamedTuple):
  """One evaluation condition, as traced arrays (``M`` modalities).

  Attributes:
    keep: ``[M]`` bool, False for a missing modality.
    fill: ``[M]`` int32, how a missing modality is replaced (index in
      ``FILLS``).
    noise: ``[M]`` float32, the noise level on each modality.
    seed: int32 scalar, the noise's rng stream (the level's index).
  """
  keep: Any
  fill: Any
  noise: Any
  seed: Any


def condition(num_modalities: int, *, keep=None, fill: str = "zeros",
              noise=None, seed: int = 0) -> Condition:
  """A ``Condition`` from Python values (defaults: all kept, no noise)."""
  keep = np.ones(num_modalities, bool) if keep is None else keep
  noise = np.zeros(num_modalities) if noise is None else noise
  return Condition(np.asarray(keep, bool),
                   np.full(num_modalities, FILLS.index(fill), np.int32),
                   np.asarray(noise, np.float32), np.int32(seed))


def modality_inputs(config: ml_collections.ConfigDict, pp: preprocess.Op,
                    vocabularies: dict[str, Vocabulary],
                    max_examples: int = STATISTICS_EXAMPLES
                    ) -> tuple[ModalityInput, ...]:
  """Each fused modality's ``ModalityInput``, with statistics over a fixed
  random sample of at most ``max_examples`` train examples under ``pp`` (the
  evaluation preprocessing)."""
  source = pipeline.data_source(config.dataset, config.input,
                                config.dataset.train_split)
  n = min(max_examples, len(source))
  indices = np.sort(np.random.default_rng(0).choice(len(source), n,
                                                    replace=False))
  chunks = [pp(pipeline.read_batch(source, part), np.random.default_rng(0))
            for part in np.array_split(indices, -(-n // 500))]
  inputs = []
  for name in config.model.modalities:
    x = np.concatenate([chunk[name] for chunk in chunks])
    has_mask = f"{name}_mask" in chunks[0]
    if np.issubdtype(x.dtype, np.integer):
      if name not in vocabularies:
        raise ValueError(f"Modality {name!r} holds integer ids {x.shape} but "
                         "no tokenize op built a vocabulary for it.")
      inputs.append(ModalityInput(name, has_mask, vocabularies[name].size))
    else:
      x = x.astype(np.float64)
      inputs.append(ModalityInput(name, has_mask, mean=x.mean(0).astype(
          np.float32), std=float(x.std())))
  return tuple(inputs)


def replace_tokens(ids: jax.Array, real: jax.Array, rate: jax.Array,
                   key: jax.Array, vocab_size: int) -> jax.Array:
  """``ids [batch, time]`` with each ``real`` token replaced, with
  probability ``rate``, by a word id drawn uniformly from ``[FIRST_WORD_ID,
  vocab_size)`` (possibly the same word)."""
  pick_key, id_key = jax.random.split(key)
  replace = real & (jax.random.uniform(pick_key, ids.shape) < rate)
  drawn = jax.random.randint(id_key, ids.shape, FIRST_WORD_ID, vocab_size,
                             ids.dtype)
  return jnp.where(replace, drawn, ids)


def corrupt(batch: dict[str, jax.Array], cond: Condition, key: jax.Array, *,
            inputs: Sequence[ModalityInput]) -> dict[str, jax.Array]:
  """``batch`` with noise at ``cond.noise``, then the modalities that
  ``cond.keep`` drops replaced as ``cond.fill`` says (module docstring)."""
  batch = dict(batch)
  for m, spec in enumerate(inputs):
    x, mask_key = batch[spec.name], f"{spec.name}_mask"
    noise_key = jax.random.fold_in(key, m)
    if spec.vocab_size:
      if spec.vocab_size <= FIRST_WORD_ID:
        raise ValueError(f"Modality {spec.name!r}'s vocabulary has no words.")
      real = (batch[mask_key].astype(bool) if spec.has_mask
              else x != Vocabulary.pad_id)
      x = replace_tokens(x, real, cond.noise[m], noise_key, spec.vocab_size)
      substitute = jnp.zeros_like(x)
    else:
      x = x + (cond.noise[m] * spec.std).astype(x.dtype) * jax.random.normal(
          noise_key, x.shape, x.dtype)
      substitute = jnp.where(cond.fill[m] == MEAN, spec.mean, 0.).astype(
          x.dtype)
    missing = ~cond.keep[m]
    batch[spec.name] = jnp.where(missing & (cond.fill[m] != MASKED),
                                 substitute, x)
    if spec.has_mask:
      mask = batch[mask_key]
      batch[mask_key] = jnp.where(missing & (cond.fill[m] == MASKED),
                                  jnp.zeros_like(mask), mask)
  return batch


def corrupted_eval_step(state: steps.TrainState, batch: dict[str, jax.Array],
                        cond: Condition, batch_index: jax.Array, *,
                        model, targets, inputs: Sequence[ModalityInput],
                        rng_impl: str, mask_key: str) -> steps.Metrics:
  """``steps.eval_step`` on ``corrupt(batch, cond)``, the noise's rng fixed
  by ``cond.seed`` and ``batch_index``."""
  key = jax.random.fold_in(jax.random.fold_in(
      jax.random.key(0, impl=rng_impl), cond.seed), batch_index)
  return steps.eval_step(state, corrupt(batch, cond, key, inputs=inputs),
                         model=model, targets=targets, axis_name=None,
                         mask_key=mask_key)


def plan(inputs: Sequence[ModalityInput], levels: Sequence[float] = LEVELS
         ) -> list[tuple[tuple[str, ...], Condition]]:
  """Every condition of the report, keyed ``("subsets", subset, fill)`` or
  ``("noise", modality | "all", level index)``."""
  names, m = [spec.name for spec in inputs], len(inputs)
  conditions = []
  for size in range(m, 0, -1):
    for kept in itertools.combinations(range(m), size):
      missing = [inputs[i] for i in range(m) if i not in kept]
      for fill in FILLS:
        if all(fill in spec.fills for spec in missing):
          conditions.append((("subsets", "+".join(names[i] for i in kept),
                              fill), condition(m, keep=np.isin(range(m), kept),
                                               fill=fill)))
  for target in names + ["all"]:
    on = np.array([target in (name, "all") for name in names])
    conditions += [(("noise", target, i), condition(m, noise=on * level,
                                                    seed=i))
                   for i, level in enumerate(levels)]
  return conditions


def relative_robustness(levels: Sequence[float],
                        accuracy: Sequence[float]) -> float:
  """MultiBench's relative robustness: the trapezoid area under accuracy vs
  noise level, levels increasing within [0, 1]."""
  levels, accuracy = np.asarray(levels, float), np.asarray(accuracy, float)
  if levels.min() < 0 or levels.max() > 1 or np.any(np.diff(levels) <= 0):
    raise ValueError(f"Noise levels must increase within [0, 1]; got "
                     f"{levels.tolist()}.")
  return float(np.sum((accuracy[1:] + accuracy[:-1]) * np.diff(levels) / 2))


def effective_robustness(accuracy: Sequence[float],
                         reference: Sequence[float]) -> float:
  """MultiBench's effective robustness: ``sum_i (a_i - (r_i + a_0 - r_0))``
  over the levels, for ``reference`` ``r`` at the same levels."""
  a, r = np.asarray(accuracy, float), np.asarray(reference, float)
  if a.shape != r.shape:
    raise ValueError(f"The reference curve has {r.size} levels; this one "
                     f"{a.size}.")
  return float(np.sum((a - a[0]) - (r - r[0])))  # Exactly 0 for r = a.


def minmax_normalize(values: dict[str, float]) -> dict[str, float]:
  """MultiBench's ``maxmin_normalize``: ``(v - min) / (max - min)`` over the
  compared methods (all 0 when they are equal)."""
  low, high = min(values.values()), max(values.values())
  return {k: (v - low) / (high - low) if high > low else 0.0
          for k, v in values.items()}


def summarize(keys: Sequence[tuple[str, ...]], accuracy: Sequence[float],
              levels: Sequence[float] = LEVELS,
              reference: dict[str, Any] | None = None) -> dict[str, Any]:
  """The ``"robustness"`` entry (module docstring) from ``plan``'s keys and
  their accuracies; ``reference``: another run's ``"noise"`` entry."""
  subsets, noise = {}, {}
  for key, value in zip(keys, accuracy):
    if key[0] == "subsets":
      subsets.setdefault(key[1], {})[key[2]] = value
    else:
      noise.setdefault(key[1], [None] * len(levels))[key[2]] = value
  curves = {}
  for target, curve in noise.items():
    ref = (reference or {}).get(target)
    if ref is not None and list(ref["levels"]) != list(levels):
      raise ValueError(f"The reference's {target!r} curve has levels "
                       f"{ref['levels']}; this one {list(levels)}.")
    curves[target] = {
        "levels": list(levels), "accuracy": curve,
        "relative_robustness": relative_robustness(levels, curve),
        "effective_robustness": (None if ref is None else
                                 effective_robustness(curve, ref["accuracy"]))}
  return {"subsets": subsets, "noise": curves}


def read_reference(workdir: str) -> dict[str, Any]:
  """The ``"noise"`` curves of another run's ``evaluation.json``."""
  path = os.path.join(workdir, "evaluation.json")
  evaluation = {}
  if os.path.exists(path):
    with open(path) as f:
      evaluation = json.load(f)
  if "robustness" not in evaluation:
    raise FileNotFoundError(
        f"{path} holds no robustness curves; run python -m mmjax.evaluate "
        f"--workdir={workdir} --robustness first.")
  return evaluation["robustness"]["noise"]


def evaluate(config: ml_collections.ConfigDict, model, pp: preprocess.Op,
             vocabularies: dict[str, Vocabulary],
             states: Sequence[steps.TrainState], split: str
             ) -> tuple[list[tuple[str, ...]], np.ndarray]:
  """``(keys, accuracy [states, keys])`` of ``plan``'s conditions on
  ``split`` (read once, after ``pp``: the evaluation preprocessing), all
  from one compiled ``corrupted_eval_step``; ``summarize`` makes them the
  ``"robustness"`` entry."""
  inputs = modality_inputs(config, pp, vocabularies)
  step = jax.jit(functools.partial(
      corrupted_eval_step, model=model,
      targets=losses.head_targets(config.model.heads), inputs=inputs,
      rng_impl=config.get("rng_impl", "threefry2x32"),
      mask_key=pipeline.MASK_KEY))
  conditions = plan(inputs)
  totals = [[None] * len(conditions) for _ in states]
  batches = pipeline.eval_batches(config.dataset, config.input, pp, split,
                                  batch_size=config.eval.batch_size)
  for b, batch in enumerate(batches):
    for s, state in enumerate(states):
      for c, (_, cond) in enumerate(conditions):
        totals[s][c] = metrics_lib.add_sums(
            totals[s][c], step(state, batch, cond, np.int32(b)))
  accuracy = np.array([[metrics_lib.sums_to_means(t)["accuracy"]
                        for t in seed_totals] for seed_totals in totals])
  return [key for key, _ in conditions], accuracy


def plot(robustness: dict[str, Any], workdir: str) -> list[str]:
  """Draws ``robustness_noise.png`` (accuracy vs level, a line per noised
  modality and "all") and ``robustness_subsets.png`` (the subset table as
  bars) into ``workdir``; returns their paths."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top

  paths = [os.path.join(workdir, f"robustness_{name}.png")
           for name in ("noise", "subsets")]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for target, curve in robustness["noise"].items():
    ax.plot(curve["levels"], curve["accuracy"], marker=".",
            label=f"{target} (rel. rob. {curve['relative_robustness']:.3f})")
  ax.set(xlabel="noise level", ylabel="accuracy", ylim=(0, 1))
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(paths[0], dpi=120)
  plt.close(fig)

  subsets = robustness["subsets"]
  fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(subsets) + 1.5), 3.5))
  width = 0.8 / len(FILLS)
  for j, fill in enumerate(FILLS):
    at = [i for i, fills in enumerate(subsets.values()) if fill in fills]
    ax.bar([i + (j - (len(FILLS) - 1) / 2) * width for i in at],
           [list(subsets.values())[i][fill] for i in at], width, label=fill)
  ax.set_xticks(range(len(subsets)), [f"keep {s}" for s in subsets],
                rotation=30, ha="right")
  ax.set(ylabel="accuracy", ylim=(0, 1))
  ax.grid(axis="y", alpha=0.3)
  ax.legend(title="missing ones", fontsize=8)
  fig.tight_layout()
  fig.savefig(paths[1], dpi=120)
  plt.close(fig)
  return paths
