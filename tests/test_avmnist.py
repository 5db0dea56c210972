"""The ``avmnist`` dataset, built from the real MNIST and FSDD archives.

Pairing by label and by take, the PCA against an independent covariance, the
spectrogram's scale on a known sine, small TFDS builds read back without
TensorFlow, and recorded checksums so builds on two machines agree.
"""

import json
import math
import os
import pathlib
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.data import avmnist as av
from mmjax.data import pipeline

RAW = pathlib.Path(__file__).resolve().parents[2] / "shared/data/avmnist_raw"
pytestmark = pytest.mark.skipif(
    not RAW.is_dir(), reason=f"AV-MNIST raw data not found at {RAW}")
SMALL = {"train": 64, "validation": 16, "test": 32}
DEFAULT = av.Avmnist.BUILDER_CONFIGS[0]


class TinyAvmnist(av.Avmnist):
  """``avmnist`` with small splits, registered under its own name."""
  name = "tiny_avmnist"
  SPLIT_SIZES = SMALL


def raw() -> av.Raw:
  return av.load_raw(str(RAW))


def generated(split, size, snr_db=DEFAULT.snr_db, **kwargs):
  return [ex for _, ex in av.generate_split(str(RAW), split, size,
                                            snr_db=snr_db, **kwargs)]


def build(data_dir) -> dict[str, str]:
  """Builds ``tiny_avmnist`` afresh (no cached fit); checksum of each split."""
  av.load_raw.cache_clear()
  av._fit_pca_cached.cache_clear()  # pylint: disable=protected-access
  TinyAvmnist(data_dir=data_dir).download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=str(RAW)))
  return {split: av.checksum(tfds.data_source(
      "tiny_avmnist", data_dir=data_dir, split=split))
          for split in SMALL}


@pytest.mark.parametrize("split", av.SPLITS)
def test_each_clip_says_its_images_digit_and_test_takes_are_held_out(split):
  r = raw()
  _, labels = av.split_rows(r, split, {"train": 55_000, "validation": 5_000,
                                       "test": 10_000}[split])
  clips = av.pair_clips(labels, split, r.clip_labels, r.takes)
  np.testing.assert_array_equal(r.clip_labels[clips], labels)
  takes = r.takes[clips]
  if split == "test":
    assert takes.min() == 40 and takes.max() == 49
  else:
    assert takes.min() == 0 and takes.max() == 39
  # Drawn from the whole pool (6 speakers x 40 or 10 takes x 10 digits);
  # validation's 5,000 draws leave ~1 - e**(-5000 / 2400) = 88% seen.
  pool = 600 if split == "test" else 2400
  seen = len(np.unique(clips)) / pool
  assert seen == 1 if split != "validation" else 0.85 < seen < 0.9
  np.testing.assert_array_equal(
      clips[:100], av.pair_clips(labels[:100], split, r.clip_labels, r.takes))


def test_pca_keeps_the_25_percent_components_and_removes_75_percent_energy():
  x = raw().x_train[:av.NUM_TRAIN]
  pca = av.fit_pca(x)
  # An independent covariance (np.cov) has the same leading eigenvalues.
  flat = x.reshape(len(x), -1).astype(np.float64)
  covariance = np.cov(flat, rowvar=False)
  eigenvalues = np.linalg.eigvalsh(covariance)[::-1]
  np.testing.assert_allclose(pca.explained_variance_ratio,
                             eigenvalues / eigenvalues.sum(), atol=1e-9)
  cumulative = np.cumsum(pca.explained_variance_ratio)
  k = len(pca.components)
  assert k == 4 and cumulative[k - 2] < 0.25 <= cumulative[k - 1] < 0.30
  np.testing.assert_allclose(pca.components @ pca.components.T, np.eye(k),
                             atol=1e-12)
  np.testing.assert_allclose(covariance @ pca.components.T,
                             pca.components.T * eigenvalues[:k], rtol=1e-8,
                             atol=1e-6)
  largest = np.abs(pca.components).argmax(axis=1)
  assert np.all(pca.components[np.arange(k), largest] > 0)
  # On the fit data, the stored images keep the kept components' variance.
  centred = flat[:5000] - pca.pixel_sum / pca.count
  images = av.pca_images(pca, x[:5000]).astype(np.float64).reshape(5000, -1)
  kept = np.sum(images**2) / np.sum(centred**2)
  assert abs(kept - cumulative[k - 1]) < 0.01, kept  # ~72% removed.
  exact = centred @ pca.components.T @ pca.components
  assert np.abs(images - exact).max() < 0.25  # float16 and the 2**-16 grid.
  # Before float16, the images are exactly rank k: nothing of the digit but
  # its k coefficients (version 1.0.0's had numerical rank 637).
  images_64 = av.pca_images(pca, x[:2000], np.float64).reshape(2000, -1)
  singular_values = np.linalg.svd(images_64, compute_uv=False)
  assert singular_values[k] < 1e-9 * singular_values[0], singular_values[:6]
  np.testing.assert_array_equal(
      images_64.astype(np.float16), images[:2000].astype(np.float16))


def test_spectrogram_of_a_sine_peaks_at_its_bin_and_level():
  t = np.arange(av.CLIP_SAMPLES) / av.SAMPLE_RATE
  hz_per_bin = av.SAMPLE_RATE / av.N_FFT  # 36 Hz.
  sines = np.stack([np.sin(2 * np.pi * 28 * hz_per_bin * t),
                    0.01 * np.sin(2 * np.pi * 56 * hz_per_bin * t)])
  spectrogram = av.log_spectrogram(sines)
  assert spectrogram.shape == (2, 112, 112, 1)
  assert spectrogram.dtype == np.uint8
  # Full scale peaks at -6 dB: code (100 - 6) * 2.55 = 240; 40 dB lower -> 138.
  for row, bin_, code in ((0, 28, 240), (1, 56, 138)):
    peak = spectrogram[row, :, :, 0].astype(int)
    assert np.all(peak.argmax(axis=1) == bin_)
    assert np.all(abs(peak.max(axis=1) - code) <= 2), peak.max(axis=1)
  np.testing.assert_array_equal(av.log_spectrogram(np.zeros((1, 8000))), 0)


def test_configs_change_only_what_they_set():
  clean, noisy = generated("test", 8, math.inf), generated("test", 8, 10.0)
  for a, b in zip(clean, noisy):
    np.testing.assert_array_equal(a["image"], b["image"])
    assert a["label"] == b["label"]
    # Noise fills the silence that the clean clip's padding leaves at 0.
    assert (a["audio"] == 0).mean() > 0.2 > (b["audio"] == 0).mean()
  wider = generated("test", 8, math.inf, keep_variance=0.3)  # 5 components.
  for a, b in zip(clean, wider):
    np.testing.assert_array_equal(a["audio"], b["audio"])
    assert np.sum(b["image"].astype(float)**2) > np.sum(
        a["image"].astype(float)**2)
  names = [c.name for c in av.Avmnist.BUILDER_CONFIGS]
  assert sorted(av.FULL_CHECKSUMS) == sorted(set(names))  # All recorded.


def test_first_examples_match_the_recorded_checksums():
  for split, digest in av.FIRST_200_CHECKSUMS.items():
    examples = generated(split, 200)
    assert av.checksum(examples) == digest, split
    assert av.checksum(generated(split, 50, batch=7)) == av.checksum(
        examples[:50])


def test_tiny_builds_read_back_as_generated_and_agree(tmp_path):
  checksums = build(tmp_path / "a")
  for split, size in SMALL.items():
    source = tfds.data_source(f"tiny_avmnist/{DEFAULT.name}",
                              data_dir=tmp_path / "a", split=split)
    assert len(source) == size
    record = source[3]
    assert record["image"].shape == (28, 28, 1)
    assert record["image"].dtype == np.float16
    assert record["audio"].shape == (112, 112, 1)
    assert record["audio"].dtype == np.uint8
    assert 0 <= record["label"] < 10
    assert checksums[split] == av.checksum(generated(split, size))
  assert build(tmp_path / "b") == checksums
  assert "tensorflow" not in sys.modules


def _dataset_config(tmp_path, manual_dir):
  """A ``config.dataset``."""
  return ml_collections.ConfigDict(dict(
      name="avmnist", config="", data_dir=str(tmp_path / "tfds"),
      manual_dir=str(manual_dir)))


def test_pipeline_says_what_to_download_then_builds(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match=(
      r"(?s)raw is missing or empty\..*train-images-idx3-ubyte\.gz.*"
      r"https://yann\.lecun\.com/exdb/mnist/.*"
      r"free-spoken-digit-dataset/archive/.*recordings/.*mnist\.npz.*"
      r"fsdd\.npz.*--config\.dataset\.manual_dir")):
    pipeline.ensure_prepared(_dataset_config(tmp_path, tmp_path / "raw"))
  monkeypatch.setattr(av.Avmnist, "SPLIT_SIZES",
                      {"train": 4, "validation": 2, "test": 2})
  builder = pipeline.ensure_prepared(_dataset_config(tmp_path, RAW))
  assert builder.info.full_name == (
      f"avmnist/{DEFAULT.name}/{av.Avmnist.VERSION}")
  assert builder.info.splits["test"].num_examples == 2


def test_a_missing_archive_is_named(tmp_path):
  (tmp_path / "mnist.npz").symlink_to(RAW / "mnist.npz")
  with pytest.raises(FileNotFoundError,
                     match=r"(?s)needs FSDD in .*fsdd\.npz.*Free Spoken Digit"):
    av.load_raw(str(tmp_path))


@pytest.mark.slow
def test_full_build_matches_the_recorded_checksums():
  # ~90-150 s on 2 CPU cores; the other configs: av.full_checksums(...).
  assert av.full_checksums(str(RAW), DEFAULT.name) == (
      av.FULL_CHECKSUMS[DEFAULT.name])


@pytest.fixture(scope="module")
def small_avmnist_dir(tmp_path_factory):
  """The default ``avmnist`` config with ``SMALL`` splits, in a fresh data_dir."""
  path = str(tmp_path_factory.mktemp("tfds"))
  builder = av.Avmnist(config=DEFAULT.name, data_dir=path)
  builder.SPLIT_SIZES = SMALL  # The subprocess finds it prepared.
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=str(RAW)))
  return path


@pytest.mark.slow
def test_avmnist_experiment_runs_end_to_end(tmp_path, small_avmnist_dir):
  """The default experiment (late fusion), as a user runs it; the other
  fusions' models are built by tests/test_sweep.py."""
  root = pathlib.Path(__file__).resolve().parents[1]
  result = subprocess.run(
      [sys.executable, "-m", "mmjax.main", "--config=experiments/avmnist.py:runlocal",
       f"--workdir={tmp_path}", f"--config.dataset.data_dir={small_avmnist_dir}",
       f"--config.dataset.manual_dir={RAW}"],
      cwd=root, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(tmp_path, "results.json")) as f:
    results = json.load(f)
  assert results["steps"] == 6
  assert 0.0 <= results["test"]["accuracy"] <= 1.0
