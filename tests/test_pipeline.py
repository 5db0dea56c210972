"""How the input pipeline splits data over processes (hosts): the global
train batch of every step is the same on any number of processes, and an
evaluation sees every example exactly once. Processes are simulated by
setting ``jax.process_index``/``process_count`` one at a time."""

import jax
import numpy as np
import pytest

from mmjax.data import pipeline
from mmjax.data import preprocess

from e2e import load_experiment

NUM_PROCESSES = 2


KEEP = preprocess.build_pp(
    preprocess.parse_pp("keep(keys=('image', 'answer'))"))
EVAL_BATCH_SIZE = 40  # 96 examples: a padded last batch.


@pytest.fixture
def config(data_dir):
  config = load_experiment().get_config("runlocal")
  config.dataset.data_dir = data_dir
  return config


def _train_batches(config, pp=KEEP):
  return pipeline.train_batches(config.dataset, config.input, pp, config.seed)


def _eval_batches(config):
  return pipeline.eval_batches(config.dataset, config.input, KEEP,
                               "validation", batch_size=EVAL_BATCH_SIZE)


def _as_process(monkeypatch, index, count):
  monkeypatch.setattr(jax, "process_index", lambda: index)
  monkeypatch.setattr(jax, "process_count", lambda: count)


def _image_ids(batch):
  """A fingerprint per example (the un-normalised image's pixel sum)."""
  return np.round(batch["image"].reshape(len(batch["image"]), -1).sum(1), 3)


def test_each_process_reads_its_rows_of_the_same_global_batch(
    config, monkeypatch):
  _as_process(monkeypatch, 0, 1)
  one = _train_batches(config)
  parts = []
  for index in range(NUM_PROCESSES):
    _as_process(monkeypatch, index, NUM_PROCESSES)
    parts.append(_train_batches(config))
  for step in (0, 1, 39, 40, 123):  # 40 steps per epoch at batch 16.
    whole = one[step]
    halves = [part[step] for part in parts]
    assert all(len(h["answer"]) == 8 for h in halves)
    for key in whole:
      np.testing.assert_array_equal(
          whole[key], np.concatenate([h[key] for h in halves]))


def test_random_preprocessing_differs_between_processes(config, monkeypatch):
  """Without a stream per process, every process would, say, crop its rows
  with the same offsets."""
  draw = lambda batch, rng: {"draw": rng.integers(2**31, size=4)}
  draws = []
  for index in range(NUM_PROCESSES):
    _as_process(monkeypatch, index, NUM_PROCESSES)
    draws.append(_train_batches(config, draw)[0]["draw"])
  assert not np.array_equal(draws[0], draws[1])
  # And again the same: the streams are deterministic.
  np.testing.assert_array_equal(
      draws[1], _train_batches(config, draw)[0]["draw"])


def test_every_eval_example_is_counted_once_across_processes(config,
                                                              monkeypatch):
  _as_process(monkeypatch, 0, 1)
  expected = sorted(np.concatenate(
      [_image_ids(b)[b[pipeline.MASK_KEY]] for b in _eval_batches(config)]))
  assert len(expected) == 96

  seen, num_batches = [], set()
  for index in range(NUM_PROCESSES):
    _as_process(monkeypatch, index, NUM_PROCESSES)
    batches = list(_eval_batches(config))
    num_batches.add(len(batches))  # Equal, or the collectives would hang.
    for batch in batches:
      assert len(batch[pipeline.MASK_KEY]) == 20  # 40 / 2 processes.
      seen.extend(_image_ids(batch)[batch[pipeline.MASK_KEY]])
  assert len(num_batches) == 1
  assert sorted(seen) == expected


def test_first_eval_batch_is_the_first_that_eval_batches_yields(
    config, monkeypatch):
  for index in range(NUM_PROCESSES):
    _as_process(monkeypatch, index, NUM_PROCESSES)
    first = pipeline.first_eval_batch(config.dataset, config.input, KEEP,
                                      "validation",
                                      batch_size=EVAL_BATCH_SIZE)
    expected = next(_eval_batches(config))
    assert first.keys() == expected.keys()
    for key in first:
      np.testing.assert_array_equal(first[key], expected[key])


def test_a_split_cached_in_memory_gives_the_same_batches(config):
  batches = {}
  for cache in (False, True):
    config.input.cache = cache
    train = _train_batches(config)
    batches[cache] = ([train[step] for step in (0, 1, 57)] +
                      list(_eval_batches(config)))
  assert isinstance(pipeline.data_source(config.dataset, config.input, "train"),
                    pipeline.DecodedSplit)
  for uncached, cached in zip(batches[False], batches[True]):
    assert uncached.keys() == cached.keys()
    for key in uncached:
      np.testing.assert_array_equal(uncached[key], cached[key])


def test_preprocessing_parses_both_pipelines_and_names_the_tokenized_fields(
    config):
  config.input.pp_train = ("normalize(key='image')|tokenize(key='caption')|"
                           "tokenize(key='question')")
  config.input.pp_eval = "tokenize(key='question')|tokenize(key='answer_text')"
  preprocessing = pipeline.Preprocessing.parse(config.input)
  assert [op.name for op in preprocessing.train] == ["normalize", "tokenize",
                                                     "tokenize"]
  assert preprocessing.text_keys == ["caption", "question", "answer_text"]
