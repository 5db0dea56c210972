"""Input pipeline: TFDS array_record data sources read through grain.

Train batches are an infinite, shuffled, deterministic sequence indexed by
step, so a resumed run reads exactly the batches an uninterrupted one would,
on any number of processes. Eval batches cover a split once, padded to
a fixed batch size with a ``_mask`` field marking real examples.

Each process (host) reads a disjoint part of every split and produces its
local part of the global batch; ``mmjax.parallel`` assembles the global batch.

Functions take the two config sections they read, ``config.dataset``
(``dataset``: which TFDS dataset, where) and ``config.input`` (``input``:
batch size, preprocessing, reader threads), and the preprocessing as a
function built once (``preprocess.build_pp`` of ``Preprocessing``'s ops).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Callable, Iterator

import grain
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from mmjax import registry
from mmjax.data import preprocess
from mmjax.data.tokenizer import Vocabulary

MASK_KEY = "_mask"


@dataclasses.dataclass(frozen=True)
class Preprocessing:
  """A run's two pipeline strings, each parsed once where the run sets up
  its data; ``preprocess.build_pp`` makes each a function.

  Attributes:
    train: the ops of ``input.pp_train``.
    eval: the ops of ``input.pp_eval``.
  """
  train: tuple[preprocess.ParsedOp, ...]
  eval: tuple[preprocess.ParsedOp, ...]

  @classmethod
  def parse(cls, input: ml_collections.ConfigDict) -> "Preprocessing":
    return cls(train=tuple(preprocess.parse_pp(input.pp_train)),
               eval=tuple(preprocess.parse_pp(input.pp_eval)))

  @property
  def text_keys(self) -> list[str]:
    """The fields either pipeline tokenizes: those that need a vocabulary."""
    return preprocess.text_keys(self.train + self.eval)


def dataset_name(dataset: ml_collections.ConfigDict) -> str:
  """``"name/config"`` as TFDS spells it."""
  if dataset.get("config"):
    return f"{dataset.name}/{dataset.config}"
  return dataset.name


def _builder(dataset: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """The builder of ``dataset`` (not prepared): one of mmjax's
  (``registry.DATASETS``) or any other dataset that TFDS knows."""
  registry.register_datasets()
  data_dir = dataset.get("data_dir") or None
  if dataset.name in registry.DATASETS:
    builder_config = {"config": dataset.config} if dataset.get("config") else {}
    return registry.DATASETS.get(dataset.name)(data_dir=data_dir,
                                               **builder_config)
  try:
    return tfds.builder(dataset_name(dataset), data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise registry.DATASETS.unknown_name_error(dataset.name) from None


def ensure_prepared(dataset: ml_collections.ConfigDict
                    ) -> tfds.core.DatasetBuilder:
  """Returns the dataset's builder, generating the dataset first if needed."""
  builder = _builder(dataset)
  if not builder.is_prepared():
    manual_dir = dataset.get("manual_dir") or None
    _check_manual_dir(builder, manual_dir)
    logging.info("Building %s into %s (first use only).", dataset_name(dataset),
                 builder.data_dir)
    print(f"Building dataset {dataset_name(dataset)} into {builder.data_dir} "
          "(first use only)...", flush=True)
    builder.download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _check_manual_dir(builder: tfds.core.DatasetBuilder,
                      manual_dir: str | None) -> None:
  """For datasets built from files the user downloads, checks they are there
  and otherwise says what to download and where to put it."""
  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if not instructions:
    return
  path = manual_dir or os.path.join(builder.data_dir_root, "downloads", "manual")
  if os.path.isdir(path) and os.listdir(path):
    return
  raise FileNotFoundError(
      f"Dataset {builder.info.full_name} is built from files you download "
      f"yourself, and {path} is missing or empty. {instructions.strip()}\n"
      "Then point --config.dataset.manual_dir at that directory.")


def data_source(dataset: ml_collections.ConfigDict,
                input: ml_collections.ConfigDict, split: str):
  """A random-access source of ``split``'s examples, for ``read_batch``.

  With ``input.cache``, the split is decoded once per process and kept in
  memory (``DecodedSplit``); otherwise each read decodes its examples.
  """
  builder = ensure_prepared(dataset)
  if not input.get("cache", False):
    return builder.as_data_source(split=split)
  key = (builder.data_dir, split)
  if key not in _DECODED:
    _DECODED[key] = DecodedSplit.decode(builder.as_data_source(split=split),
                                        input.num_threads)
  return _DECODED[key]


class DecodedSplit:
  """A whole split as ``{field: [examples, ...]}`` numpy arrays.

  Decoding TFDS examples (protobuf parsing, one example at a time) is most of
  the pipeline's time: on ``mm_shapes``, 21 ms of 25 ms per batch of 128 on
  this 2-core CPU. A split decoded once (60,000 ``mm_shapes`` examples take
  ~200 MB) is read by indexing instead.
  """

  def __init__(self, arrays: dict[str, np.ndarray]):
    self.arrays = arrays

  @classmethod
  def decode(cls, source, num_threads: int) -> "DecodedSplit":
    chunks = list(_read_all(source, num_threads))
    return cls({key: np.concatenate([chunk[key] for chunk in chunks])
                for key in chunks[0]})

  def __len__(self) -> int:
    return len(next(iter(self.arrays.values())))

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    return {key: values[indices] for key, values in self.arrays.items()}


# Splits decoded by this process: (data_dir, split) -> DecodedSplit.
_DECODED: dict[tuple[str, str], DecodedSplit] = {}


def _read_all(source, num_threads: int) -> Iterator[dict[str, np.ndarray]]:
  """Every example of ``source``, in order, in batches of up to 1024 read by
  ``num_threads`` threads."""
  return iter(grain.MapDataset.range(len(source)).batch(1024)
              .map(lambda indices: read_batch(source, indices))
              .to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))


def load_or_build_vocabularies(dataset: ml_collections.ConfigDict,
                               input: ml_collections.ConfigDict,
                               keys: list[str],
                               workdir: str) -> dict[str, Vocabulary]:
  """Word vocabularies for the fields ``keys`` (``Preprocessing.text_keys``),
  from the train split.

  A vocabulary is saved in ``workdir/vocab/`` the first time, and read back on
  resume, so a run keeps the ids its checkpoint was trained with.
  """
  vocabularies = {}
  for key in keys:
    path = vocabulary_path(workdir, key)
    if os.path.exists(path):
      vocabularies[key] = Vocabulary.load(path)
      continue
    vocabularies[key] = build_vocabulary(dataset, input, key)
    if jax.process_index() == 0:
      vocabularies[key].save(path)
  return vocabularies


def vocabulary_path(workdir: str, key: str) -> str:
  """Where a run keeps field ``key``'s vocabulary."""
  return os.path.join(workdir, "vocab", f"{key}.json")


def build_vocabulary(dataset: ml_collections.ConfigDict,
                     input: ml_collections.ConfigDict, key: str) -> Vocabulary:
  """The word vocabulary of field ``key`` (texts ``[examples]``) over the
  train split (not saved)."""
  source = data_source(dataset, input, dataset.train_split)
  return Vocabulary.from_texts(
      text for chunk in _read_all(source, input.num_threads)
      for text in chunk[key])


def local_batch_size(global_batch_size: int) -> int:
  if global_batch_size % jax.process_count():
    raise ValueError(f"Batch size {global_batch_size} is not divisible by the "
                     f"number of processes ({jax.process_count()}).")
  return global_batch_size // jax.process_count()


def _host_shard(dataset: grain.MapDataset) -> grain.MapDataset:
  return dataset[jax.process_index()::jax.process_count()]


def train_batches(dataset: ml_collections.ConfigDict,
                  input: ml_collections.ConfigDict, pp: preprocess.Op,
                  seed: int) -> grain.MapDataset:
  """Local train batches after ``pp`` (``input.pp_train``'s function),
  indexed by step (infinite): ``{field: [local_batch, ...]}``.

  Element ``step`` is this process's part of the global batch that train step
  ``step`` reads: the train split is shuffled and batched once, globally, with
  ``seed`` (a run's ``config.seed``), and process ``p`` of ``P`` takes rows
  ``[p * B / P, (p + 1) * B / P)`` of each global batch of ``B`` (and reads
  only those). So the global batches, and therefore the run, do not depend on
  the number of processes, and a run resumes at ``step`` without any saved
  iterator state.
  Random preprocessing draws from one stream per process (on one process, the
  stream grain gives each batch).
  """
  source = data_source(dataset, input, dataset.train_split)
  size = local_batch_size(input.batch_size)
  index, count = jax.process_index(), jax.process_count()

  def read(global_indices, rng):
    if count > 1:  # Otherwise every process would draw the same values.
      rng = np.random.default_rng([int(rng.integers(2**63)), index])
    rows = global_indices[index * size:(index + 1) * size]
    return pp(read_batch(source, rows), rng)

  return (grain.MapDataset.range(len(source))
          .seed(seed)
          .shuffle()
          .repeat()
          .batch(input.batch_size, drop_remainder=True)
          .random_map(read))


def train_batches_over_seeds(dataset: ml_collections.ConfigDict,
                             input: ml_collections.ConfigDict,
                             pp: preprocess.Op,
                             seeds: list[int]) -> grain.MapDataset:
  """``train_batches`` of each of ``seeds``, stacked on a second axis.

  Element ``step`` holds ``[local_batch, len(seeds), ...]`` arrays whose
  ``[:, k]`` is element ``step`` of ``train_batches(dataset, input, pp,
  seeds[k])``: seed ``k`` reads the batches of a run with ``config.seed =
  seeds[k]`` (the example axis stays first, so it is split over devices).
  """
  per_seed = [train_batches(dataset, input, pp, seed) for seed in seeds]
  stack = lambda batches: {key: np.stack([b[key] for b in batches], axis=1)
                           for key in batches[0]}
  return grain.experimental.ZipMapDataset(parents=per_seed).map(stack)


def iterate_from(batches: grain.MapDataset, step: int,
                 input: ml_collections.ConfigDict):
  """Batches ``step, step + 1, ...`` of ``batches``, read ahead by
  ``input.num_threads`` threads."""
  read_options = grain.ReadOptions(
      num_threads=input.num_threads,
      prefetch_buffer_size=input.prefetch_batches)
  return iter(batches[step:].to_iter_dataset(read_options))


def read_batch(source, indices: np.ndarray) -> dict[str, np.ndarray]:
  """Examples ``indices`` of ``source`` stacked into ``[batch, ...]`` arrays.

  One batched read (``__getitems__``) decodes ~1.6x faster than reading
  example by example, which is what bounds the pipeline on a small CPU.
  """
  if isinstance(source, DecodedSplit):
    return source.read(np.asarray(indices))
  examples = source.__getitems__([int(i) for i in indices])
  return {key: np.stack([ex[key] for ex in examples]) for key in examples[0]}


def eval_batches(dataset: ml_collections.ConfigDict,
                 input: ml_collections.ConfigDict, pp: preprocess.Op,
                 split: str, *, batch_size: int
                 ) -> Iterator[dict[str, np.ndarray]]:
  """Every example of ``split`` once, after ``pp`` (``input.pp_eval``'s
  function), in local batches of a fixed size: this process's part of
  global batches of ``batch_size`` (``config.eval.batch_size``).

  The last batch is padded with zeros; ``batch["_mask"]`` ``[local_batch]``
  is True on real examples. Every process yields the same number of batches.
  """
  size, local_size, read = _eval_reader(dataset, input, pp, split, batch_size)
  per_host = -(-size // jax.process_count())
  num_batches = -(-per_host // local_size)
  batches = (_host_shard(grain.MapDataset.range(size))
             .batch(local_size)
             .map(read))
  read_options = grain.ReadOptions(num_threads=input.num_threads,
                                   prefetch_buffer_size=4)
  iterator = iter(batches.to_iter_dataset(read_options))
  template = None
  for _ in range(num_batches):
    batch = next(iterator, None)
    if batch is None:  # This host ran out before the others.
      batch = jax.tree.map(lambda x: x[:0], template)
    template = batch
    yield pad_batch(batch, local_size)


def first_eval_batch(dataset: ml_collections.ConfigDict,
                     input: ml_collections.ConfigDict, pp: preprocess.Op,
                     split: str, *, batch_size: int) -> dict[str, np.ndarray]:
  """The first batch ``eval_batches`` yields on this host, read directly
  (no reader threads, no evaluation started): what compiling the eval step
  ahead of time needs."""
  size, local_size, read = _eval_reader(dataset, input, pp, split, batch_size)
  host_indices = np.arange(size)[jax.process_index()::jax.process_count()]
  return pad_batch(read(host_indices[:local_size]), local_size)


def _eval_reader(dataset: ml_collections.ConfigDict,
                 input: ml_collections.ConfigDict, pp: preprocess.Op,
                 split: str, batch_size: int
                 ) -> tuple[int, int, Callable[[np.ndarray], dict[str, Any]]]:
  """``(examples in split, local batch size, read)``: ``read(indices)`` is
  those examples of ``split`` after ``pp`` (its random ops drawing from a
  fixed seed), as every evaluation reads them."""
  source = data_source(dataset, input, split)
  read = lambda indices: pp(read_batch(source, indices),
                            np.random.default_rng(0))
  return len(source), local_batch_size(batch_size), read


def pad_batch(batch: dict[str, np.ndarray],
              batch_size: int) -> dict[str, np.ndarray]:
  """Zero-pads every field to ``batch_size`` rows and adds ``_mask``."""
  n = len(next(iter(batch.values())))
  padded = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:],
                                           v.dtype)])
            for k, v in batch.items()}
  padded[MASK_KEY] = np.arange(batch_size) < n
  return padded
