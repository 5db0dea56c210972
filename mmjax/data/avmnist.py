"""``avmnist``: AV-MNIST (MNIST images + spoken digits from FSDD), for TFDS.

AV-MNIST pairs each MNIST digit with a recording of someone saying the same
digit, and weakens both modalities so that neither alone suffices (Vielzeuf et
al., "CentralNet", 2018, arXiv:1808.07275; used by MultiBench, Liang et al.,
2021, arXiv:2107.07502). This builder recreates it from the raw sources,
deterministically, following the MultiBench generator (``_MFAS/avmnist``)
where it can and saying where it cannot:

* **Splits** (as MultiBench): ``train`` = MNIST train rows 0-54,999,
  ``validation`` = rows 55,000-59,999, ``test`` = the 10,000 MNIST test rows.
  A subclass with a smaller ``SPLIT_SIZES`` builds the first N rows of each.
* **image** ``float16 [28, 28, 1]``: the MNIST image (pixel units 0-255) with
  ~75% of its energy removed by PCA. PCA is fit on the 55,000 train rows only
  (the original fit each split separately), keeps the leading components
  whose cumulative explained variance first reaches 25% (4 on MNIST, 28.3% of
  the variance) and reconstructs *without* adding the mean back:
  ``image = (x - mean) @ V_k.T @ V_k``. float16 (11-bit mantissa, error
  <= 0.13 px below 256) keeps more precision than the 8-bit source and halves
  the size of float32; divide by 255 to get MultiBench's scale. The 4 PCA
  coefficients bound image-only accuracy: kNN on them scores 65% on test
  (77% with 5 components, 84% with 6); the config's ``keep_variance`` sets
  the cut. Each image is a function of its k coefficients alone (version
  1.1.0; in 1.0.0 a rounded projector of numerical rank 637 let each image
  hold a ~0.01 px full-rank trace of the digit, which an SVM on per-pixel
  standardised images read: docs/avmnist.md).
* **audio** ``uint8 [112, 112, 1]``, axes ``[time, frequency, 1]``: a
  log-magnitude spectrogram of an FSDD clip of the same digit. Clips come
  from takes 0-39 for train and validation and takes 40-49 for test, so no
  recording is in both train and test; for each example the clip is drawn
  uniformly from its digit's pool (``pair_clips``). Each clip is centred in
  a 1 s window (8,000 samples at 8 kHz: shorter clips zero-padded, the 0.7%
  longer ones cropped to their middle), white Gaussian noise is added to the
  whole window at the config's SNR (relative to the power of the clip's own
  samples), and the STFT uses a 222-sample Hann window (``np.hanning``) with
  hop 70, giving 112 frames x 112 bins (0-4 kHz, ~36 Hz each). Power is
  scaled so that a full-scale sine peaks near -6 dB; the dB values are
  clipped to ``DB_RANGE`` = [-100, 0] and mapped linearly to 0-255
  (``code = round((dB + 100) * 2.55)``, ~0.39 dB a step).
  The original added ESC-50 environmental noise (one clip of each class,
  noise_power 0.009 in an early revision, 0 in the latest) and drew each
  clip's spectrogram with matplotlib, stretching every clip to 112 frames.
  ESC-50 is not available here (CC BY-NC, 861 MB), so white noise at a
  calibrated SNR stands in for it.
* **label**: the digit, 0-9.

Configs (``AvMnistConfig``) set ``snr_db`` and ``keep_variance``. The
default, ``snr_m10db``, was chosen so that the audio-only LeNet lands near the
published ~66% (66.9% at 1 epoch, ``docs/avmnist.md``); ``keep_variance``
stays at the recipe's 25%.

Randomness: example ``i`` of a split takes the ``i``-th draw of
``default_rng([SEED, split_index, 0])`` for its clip and of
``default_rng([SEED, split_index, 1])`` for its noise (8,000 normals each,
scaled to the SNR; ``split_index`` 0, 1, 2 for train, validation, test), so
configs differ only in the noise's scale, and the first N examples are the
same whatever N is. ``checksum`` hashes examples; ``FULL_CHECKSUMS`` records
full builds.

The sources are read from ``manual_dir`` as distributed (MNIST's four idx
files, FSDD's ``recordings/`` folder or the zip of its repository) or as the
numpy archives ``mnist.npz`` and ``fsdd.npz``, the same arrays either way
(``avmnist_sources``; ``MANUAL_DOWNLOAD_INSTRUCTIONS`` says what to download).

Build and read, without TensorFlow::

  import tensorflow_datasets as tfds
  import mmjax.data.avmnist  # registers the builder

  builder = tfds.builder("avmnist", data_dir=data_dir)  # snr_m10db
  builder.download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=raw_dir))
  train = tfds.data_source("avmnist", data_dir=data_dir, split="train")

(the training loop does this on first use, with ``config.dataset.manual_dir``:
``mmjax.data.pipeline.ensure_prepared``).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import os
from typing import Iterable, Iterator, NamedTuple

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from mmjax.data import avmnist_sources as sources
from mmjax.registry import DATASETS

SPLITS = ("train", "validation", "test")
NUM_TRAIN = 55_000  # MNIST train rows in `train`; the rest are `validation`.
NUM_CLASSES = 10
KEEP_VARIANCE = 0.25  # PCA keeps components up to this explained variance.
SAMPLE_RATE = sources.SAMPLE_RATE  # FSDD's 8 kHz.
CLIP_SAMPLES = 8000  # 1 s window.
N_FFT = 222  # STFT frame: 222 // 2 + 1 = 112 frequency bins.
HOP = 70  # 1 + (8000 - 222) // 70 = 112 frames.
NUM_FRAMES = 1 + (CLIP_SAMPLES - N_FFT) // HOP
DB_RANGE = (-100.0, 0.0)  # dB clipped to this and mapped to 0-255.
TAKES = {"train": (0, 40), "validation": (0, 40), "test": (40, 50)}
SEED = 1808_07275  # CentralNet's arXiv id.
BATCH = 256  # Examples computed at once (memory ~50 MB).
IMAGE_SHAPE = (28, 28, 1)
AUDIO_SHAPE = (NUM_FRAMES, N_FFT // 2 + 1, 1)
# Features as stored and hashed; ClassLabel reads back as int64.
DTYPES = {"image": np.float16, "audio": np.uint8, "label": np.int64}

# ``checksum`` of the first 200 examples of each split of the default config
# (dataset version 1.1.0): a quick check of a build, or of a change.
FIRST_200_CHECKSUMS: dict[str, str] = {
    "train": "3c82e25a0c80550684a3971df01a95db7bbb466219ac6a83f46186219a9c2803",
    "validation":
        "1b180bf16d1979e0eea8caa6a7ed9c082fa0e9d9acd74f855b9f9c96d6f56bd3",
    "test": "8bb875526e203ecf85b043f26870486d56cf0678682897567a17e76e44aff6e2",
}
# ``full_checksums``: sha256 (``checksum``) of every example of each split of
# a full build (dataset version 1.1.0), made with numpy 2.4.6 on x86-64.
# Rerun it after changing the configs or the recipe.
FULL_CHECKSUMS: dict[str, dict[str, str]] = {
    "snr_m10db": {
        "train":
            "f6a316f14945672b0d80a86ccdf441bf9eed502c0bb29f5f851eb120b4069002",
        "validation":
            "780dbd24e9bbf77affca335e9318b47b41b504e595a6f3684dedfbc0504441c0",
        "test":
            "4707dc3d3c40f1d8c292773b39089d80874f651def9cab19825fd807e1ca984a",
    },
    "snr_0db": {
        "train":
            "6c4b01ed09cc05d66cb4b231fc9bf7708dba6085a8a1d9c3433f632181676de3",
        "validation":
            "a7b65c46dc9c6b39a0b08ba5cec2d32bcbb71d54bc5b6a81a0196ae20e1348f9",
        "test":
            "907a03ba27c6da8da9de08fdb48af6dc26b85a8ba2f5baae7b5cd620314f827e",
    },
    "snr_inf": {
        "train":
            "3331df50572048dbb76e1c34e4534db3ab61896c43fbd14db1f9c44438d29eb6",
        "validation":
            "6b4672e5209ceb07536a78f35669b673b9fb0b11dc2bdb7096e41891ae4a8654",
        "test":
            "c5352a0a0fd518f0a54a0b1d6eb7258ad26872237681865c6f2a42a04e0d8dd4",
    },
    "snr_10db": {
        "train":
            "6a9f2dbe977bbe6d2e73b63db614e2a242e62853669204ae1c6ebe39ecad356c",
        "validation":
            "daeadd46fdae84f9c23e7f34a9936c328140d78e812c3b58ab2b1c6013623c29",
        "test":
            "05071b19259afad57f871e02199fee7356278692b1eb122bc34190848378ba26",
    },
}


@dataclasses.dataclass(eq=False)
class AvMnistConfig(tfds.core.BuilderConfig):
  """A config: ``snr_db`` is the speech-to-noise ratio in dB (``inf``: no
  noise); PCA keeps components up to ``keep_variance`` explained variance."""
  snr_db: float = 0.0
  keep_variance: float = KEEP_VARIANCE


class Raw(NamedTuple):
  """The arrays the build reads: MNIST and FSDD as ``avmnist_sources`` reads
  them from ``mnist.npz`` and ``fsdd.npz`` or from the downloaded files."""
  x_train: np.ndarray  # uint8 [60000, 28, 28]
  y_train: np.ndarray  # uint8 [60000]
  x_test: np.ndarray  # uint8 [10000, 28, 28]
  y_test: np.ndarray  # uint8 [10000]
  audio: np.ndarray  # int16 [total samples]
  offsets: np.ndarray  # int64 [clips + 1]
  clip_labels: np.ndarray  # uint8 [clips]
  takes: np.ndarray  # uint8 [clips]


class Pca(NamedTuple):
  """A PCA fit; ``mean = pixel_sum / count``."""
  pixel_sum: np.ndarray  # float64 [784], integers: the fit images summed
  count: int  # images fit
  components: np.ndarray  # float64 [k, 784], largest entry of each positive
  explained_variance_ratio: np.ndarray  # float64 [784], descending
  components_q: np.ndarray  # float64 [k, 784] integers, components * 2**16


@functools.cache
def load_raw(manual_dir: str) -> Raw:
  """Reads and checks MNIST and FSDD, from whichever files ``manual_dir``
  holds (``avmnist_sources``; cached per directory)."""
  mnist = sources.load_mnist(manual_dir)
  fsdd = sources.load_fsdd(manual_dir)
  raw = Raw(mnist.x_train, mnist.y_train, mnist.x_test, mnist.y_test,
            fsdd.audio, fsdd.offsets, fsdd.labels, fsdd.takes)
  expected = {"x_train": ((60000, 28, 28), np.uint8),
              "y_train": ((60000,), np.uint8),
              "x_test": ((10000, 28, 28), np.uint8),
              "y_test": ((10000,), np.uint8),
              "audio": (raw.audio.shape, np.int16),
              "offsets": ((len(raw.clip_labels) + 1,), np.int64),
              "takes": (raw.clip_labels.shape, np.uint8)}
  for name, (shape, dtype) in expected.items():
    value = getattr(raw, name)
    if value.shape != shape or value.dtype != dtype:
      raise ValueError(
          f"AV-MNIST raw {name} is {value.dtype}{list(value.shape)}, "
          f"expected {np.dtype(dtype)}{list(shape)}.")
  return raw


# Image.


@functools.cache
def _fit_pca_cached(manual_dir: str, keep_variance: float) -> Pca:
  return fit_pca(load_raw(manual_dir).x_train[:NUM_TRAIN], keep_variance)


def fit_pca(x_uint8: np.ndarray, keep_variance: float = KEEP_VARIANCE) -> Pca:
  """PCA of ``uint8 [n, 28, 28]`` images, made to agree across machines.

  The Gram matrix of the uint8 pixels is exact in float64 whatever the BLAS,
  so the covariance is exact up to elementwise rounding. The kept components
  are rounded to multiples of 2**-16 (``components_q``), which hides the last
  bits in which two LAPACKs may differ (unless an entry lies within ~1e-12 of
  a rounding boundary); ``pca_images`` then computes in exact integer
  arithmetic. Eigenvector signs are fixed (largest entry positive).
  """
  x = x_uint8.reshape(len(x_uint8), -1).astype(np.float64)
  n = len(x)
  total = x.sum(axis=0)  # Exact: integers below 2**53.
  covariance = (x.T @ x - np.outer(total, total) / n) / (n - 1)
  variances, vectors = np.linalg.eigh(covariance)
  variances, vectors = variances[::-1], vectors[:, ::-1]
  ratio = np.maximum(variances, 0) / np.maximum(variances, 0).sum()
  k = int(np.searchsorted(np.cumsum(ratio), keep_variance) + 1)
  components = vectors[:, :k].T
  largest = np.argmax(np.abs(components), axis=1)
  components *= np.sign(components[np.arange(k), largest])[:, None]
  return Pca(total, n, components, ratio, np.rint(components * 2.0**16))


def pca_images(pca: Pca, x_uint8: np.ndarray,
               dtype: np.dtype = np.float16) -> np.ndarray:
  """``uint8 [n, 28, 28]`` -> ``dtype [n, 28, 28, 1]``, ``(x - mean) @
  V.T @ V`` with ``V = components_q / 2**16``: in float64, exactly rank k.

  Pixel units (0-255). The centred coefficients are rounded to integers (in
  units of 2**-16 px); every other product and partial sum is an integer
  below 2**53, so the result does not depend on the summation order.
  """
  x = x_uint8.reshape(len(x_uint8), -1).astype(np.float64)
  v_q = pca.components_q
  # n * (x - mean) @ V.T * 2**16, exact; then one correctly rounded division.
  coefficients = np.rint((pca.count * (x @ v_q.T) - pca.pixel_sum @ v_q.T)
                         / pca.count)
  out = coefficients @ v_q / 2.0**32
  return out.astype(dtype).reshape(len(x), *IMAGE_SHAPE)


# Audio.


def pair_clips(labels: np.ndarray, split: str,
               clip_labels: np.ndarray, takes: np.ndarray) -> np.ndarray:
  """FSDD clip (row) for each example: one of its digit's clips whose take is
  in ``TAKES[split]``, drawn uniformly by ``default_rng([SEED, split, 0])``."""
  u = np.random.default_rng([SEED, _split_index(split), 0]).random(len(labels))
  low, high = TAKES[split]
  clips = np.empty(len(labels), np.int64)
  for digit in range(NUM_CLASSES):
    pool = np.flatnonzero((clip_labels == digit) & (low <= takes) &
                          (takes < high))
    rows = labels == digit
    clips[rows] = pool[(u[rows] * len(pool)).astype(np.int64)]
  return clips


def centred_clips(raw: Raw,
                  clips: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """``(waves float64 [n, CLIP_SAMPLES] in [-1, 1), power float64 [n])``.

  Each clip is centred in the window; ``power`` is the mean square of the
  clip's samples inside it, computed exactly in int64.
  """
  waves = np.zeros((len(clips), CLIP_SAMPLES))
  power = np.empty(len(clips))
  for row, clip in enumerate(clips):
    samples = raw.audio[raw.offsets[clip]:raw.offsets[clip + 1]]
    if len(samples) > CLIP_SAMPLES:
      start = (len(samples) - CLIP_SAMPLES) // 2
      samples = samples[start:start + CLIP_SAMPLES]
    pad = (CLIP_SAMPLES - len(samples)) // 2
    waves[row, pad:pad + len(samples)] = samples / 32768.0
    wide = samples.astype(np.int64)
    power[row] = int(np.dot(wide, wide)) / len(samples) / 32768.0**2
  return waves, power


def log_spectrogram(waves: np.ndarray) -> np.ndarray:
  """``float64 [n, CLIP_SAMPLES]`` -> ``uint8 [n, 112, 112, 1]``, axes
  ``[example, time, frequency, 1]``."""
  window = np.hanning(N_FFT)
  frames = np.lib.stride_tricks.sliding_window_view(
      waves, N_FFT, axis=-1)[:, ::HOP]  # [n, frames, N_FFT], a view
  spectrum = np.fft.rfft(frames * window, axis=-1)
  # In place, one buffer: x = (re**2 + im**2) / sum(window)**2, then
  # code = round((clip(10 log10(x), low, high) - low) * 255 / (high - low)).
  x = np.square(spectrum.real)
  x += np.square(spectrum.imag)
  x /= window.sum()**2
  low, high = DB_RANGE
  np.maximum(x, 1e-30, out=x)
  np.log10(x, out=x)
  x *= 10
  np.clip(x, low, high, out=x)
  x -= low
  x *= 255 / (high - low)
  np.rint(x, out=x)
  return x.astype(np.uint8)[..., None]


# Examples.


def _split_index(split: str) -> int:
  if split not in SPLITS:
    raise ValueError(f"Unknown split {split!r}. Valid: {', '.join(SPLITS)}.")
  return SPLITS.index(split)


def split_rows(raw: Raw, split: str, num_examples: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """The first ``num_examples`` MNIST ``(images, labels)`` of ``split``."""
  start = NUM_TRAIN if split == "validation" else 0
  size = {"train": NUM_TRAIN, "validation": 60_000 - NUM_TRAIN,
          "test": 10_000}[split]
  if not 0 <= num_examples <= size:
    raise ValueError(f"{split} has {size} examples, not {num_examples}.")
  x, y = ((raw.x_test, raw.y_test) if split == "test" else
          (raw.x_train, raw.y_train))
  return x[start:start + num_examples], y[start:start + num_examples]


def generate_split(manual_dir: str, split: str, num_examples: int, *,
                   snr_db: float, keep_variance: float = KEEP_VARIANCE,
                   batch: int = BATCH) -> Iterator[tuple[int, dict]]:
  """Yields ``(index, example)`` for examples ``0 .. num_examples - 1``."""
  raw = load_raw(manual_dir)
  pca = _fit_pca_cached(manual_dir, keep_variance)
  images, labels = split_rows(raw, split, num_examples)
  clips = pair_clips(labels, split, raw.clip_labels, raw.takes)
  noise_rng = np.random.default_rng([SEED, _split_index(split), 1])
  for start in range(0, num_examples, batch):
    rows = slice(start, min(start + batch, num_examples))
    waves, power = centred_clips(raw, clips[rows])
    if not math.isinf(snr_db):
      scale = np.sqrt(power / 10**(snr_db / 10))
      waves += scale[:, None] * noise_rng.standard_normal(waves.shape)
    audio = log_spectrogram(waves)
    image = pca_images(pca, images[rows])
    for i, index in enumerate(range(rows.start, rows.stop)):
      yield index, {"image": image[i], "audio": audio[i],
                    "label": np.int64(labels[index])}


def checksum(examples: Iterable[dict]) -> str:
  """sha256 over the bytes of each example's fields, as stored, in order."""
  digest = hashlib.sha256()
  for example in examples:
    for key, dtype in DTYPES.items():
      digest.update(np.ascontiguousarray(example[key], dtype).tobytes())
  return digest.hexdigest()


def full_checksums(manual_dir: str, config_name: str) -> dict[str, str]:
  """``checksum`` of every split of a full build (~90 s on 2 CPU cores);
  what ``FULL_CHECKSUMS[config_name]`` records."""
  config = Avmnist.builder_configs[config_name]
  return {split: checksum(ex for _, ex in generate_split(
      manual_dir, split, size, snr_db=config.snr_db,
      keep_variance=config.keep_variance))
          for split, size in Avmnist.SPLIT_SIZES.items()}


# TFDS.


@DATASETS.register("avmnist")
class Avmnist(tfds.core.GeneratorBasedBuilder):
  """The ``avmnist`` dataset; override ``SPLIT_SIZES`` for a smaller build."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "1.1.0": "Images of exactly rank 4: 1.0.0's rounded projector (rank "
               "637) let each image carry a faint full-rank trace of its "
               "digit.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = sources.MANUAL_DOWNLOAD_INSTRUCTIONS
  # Provisional SNRs, to be calibrated so that image-only and audio-only
  # models score as in MultiBench. The first config is the default.
  BUILDER_CONFIGS = [
      AvMnistConfig(name="snr_m10db", snr_db=-10.0,
                    description="White noise 10 dB louder than the speech."),
      AvMnistConfig(name="snr_0db", snr_db=0.0,
                    description="White noise as loud as the speech."),
      AvMnistConfig(name="snr_10db", snr_db=10.0,
                    description="White noise 10 dB below the speech."),
      AvMnistConfig(name="snr_inf", snr_db=math.inf,
                    description="Clean speech, no noise."),
  ]
  SPLIT_SIZES = {"train": NUM_TRAIN, "validation": 5_000, "test": 10_000}
  # TFDS finds this file through the `importlib_resources` backport, which it
  # needs but does not require on Python >= 3.9 (tensorflow/datasets#11212).
  code_path = epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="MNIST digits with 75% of their PCA energy removed, paired "
                    "by label with noisy spoken-digit spectrograms (FSDD).",
        features=tfds.features.FeaturesDict({
            # Raw bytes: as a list of numbers it writes several times slower.
            "image": tfds.features.Tensor(
                shape=IMAGE_SHAPE, dtype=np.float16,
                encoding=tfds.features.Encoding.BYTES),
            "audio": tfds.features.Tensor(
                shape=AUDIO_SHAPE, dtype=np.uint8,
                encoding=tfds.features.Encoding.BYTES),
            "label": tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=None,
        homepage="https://github.com/pliang279/MultiBench",
        # Keep records in index order, so record i is example i.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    return {split: self._generate_examples(manual_dir, split, num_examples)
            for split, num_examples in self.SPLIT_SIZES.items()}

  def _generate_examples(self, manual_dir: str, split: str,
                         num_examples: int) -> Iterator[tuple[int, dict]]:
    config = self.builder_config
    return generate_split(manual_dir, split, num_examples,
                          snr_db=config.snr_db,
                          keep_variance=config.keep_variance)
