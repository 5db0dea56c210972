"""AV-MNIST's two sources, MNIST and FSDD, read from what the user downloaded.

Each source is looked for in ``manual_dir`` in two forms, the numpy archive
first:

* **MNIST**: ``mnist.npz``; or the four idx files as distributed
  (``MNIST_FILES``, gzipped or not), parsed here with numpy.
* **FSDD**: ``fsdd.npz``; or the repository's ``recordings/`` folder of
  ``{digit}_{speaker}_{take}.wav`` files (in ``manual_dir`` or one folder down,
  as a clone or an unpacked zip leaves it); or a ``*.zip`` holding
  ``recordings/*.wav`` (the repository as GitHub zips it). The wavs are read
  with the standard library's ``wave``: 8 kHz, mono, 16-bit PCM.

Both forms of the same data give the same arrays, byte for byte (``Mnist``,
``Fsdd``; the archives hold the clips in the order ``fsdd_from_clips`` sorts
them into), so the same examples. ``MANUAL_DOWNLOAD_INSTRUCTIONS`` says what
to download and where to put it.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import struct
from typing import Iterable, Iterator, NamedTuple
import wave
import zipfile

import numpy as np

SAMPLE_RATE = 8000
# Mnist field -> idx file name (without ``.gz``), and the idx magic number's
# dimension count: 3 for images, 1 for labels.
MNIST_FILES = {"x_train": ("train-images-idx3-ubyte", 3),
               "y_train": ("train-labels-idx1-ubyte", 1),
               "x_test": ("t10k-images-idx3-ubyte", 3),
               "y_test": ("t10k-labels-idx1-ubyte", 1)}
MNIST_URL = "https://yann.lecun.com/exdb/mnist/"
MNIST_MIRROR = "https://storage.googleapis.com/cvdf-datasets/mnist/"
FSDD_URL = "https://github.com/Jakobovski/free-spoken-digit-dataset"
# The FSDD commit that shared/data/avmnist_raw/fsdd.npz (3,000 clips) and
# avmnist.FULL_CHECKSUMS come from; FSDD grows as speakers contribute.
FSDD_COMMIT = "26eb9aaf76e81b692f806f9140c2d2777410d7a1"
# A wav in a recordings/ folder, and the digit, speaker and take in its name.
RECORDINGS_WAV = re.compile(r"(?:^|/)recordings/[^/]+\.wav$")
RECORDING = re.compile(r"(?:^|/)recordings/(\d)_([^_/]+)_(\d+)\.wav$")

MANUAL_DOWNLOAD_INSTRUCTIONS = f"""\
AV-MNIST is built from MNIST and the Free Spoken Digit Dataset (FSDD).
Download both into one directory, the manual_dir, as they are distributed:
  MNIST  the four idx files, gzipped (or unpacked):
           train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
           t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
         from {MNIST_URL} or a mirror such as
           {MNIST_MIRROR}
         (e.g. {MNIST_MIRROR}train-images-idx3-ubyte.gz).
  FSDD   the recordings/ folder of
           {FSDD_URL}
         (3,000 {{digit}}_{{speaker}}_{{take}}.wav, 8 kHz mono 16-bit): the zip
         of the repository as downloaded, unopened, either the snapshot that
         avmnist.FULL_CHECKSUMS was recorded from,
           {FSDD_URL}/archive/{FSDD_COMMIT}.zip
         or the latest, free-spoken-digit-dataset-master.zip,
           {FSDD_URL}/archive/refs/heads/master.zip
         (any *.zip holding recordings/*.wav will do); or the recordings/
         folder itself, as manual_dir/recordings/ or one folder down (a git
         clone inside manual_dir).
For example, manual_dir holds:
  train-images-idx3-ubyte.gz  train-labels-idx1-ubyte.gz
  t10k-images-idx3-ubyte.gz   t10k-labels-idx1-ubyte.gz
  free-spoken-digit-dataset-{FSDD_COMMIT}.zip
Either source may instead be a numpy archive (np.savez_compressed, no object
arrays), read first when present, as in mmjax's shared data folder
(shared/data/avmnist_raw, with a README):
  mnist.npz  x_train uint8 [60000, 28, 28], y_train uint8 [60000], x_test
             uint8 [10000, 28, 28], y_test uint8 [10000], in the idx order.
  fsdd.npz   audio int16 [total samples] (the clips concatenated, sorted by
             (speaker, digit, take)), offsets int64 [clips + 1] (clip k =
             audio[offsets[k]:offsets[k+1]]), labels uint8 [clips] (digit),
             repetition uint8 [clips] (take), sample_rate int32 scalar (8000).
"""


class Mnist(NamedTuple):
  """MNIST in the idx files' order."""
  x_train: np.ndarray  # uint8 [60000, 28, 28]
  y_train: np.ndarray  # uint8 [60000]
  x_test: np.ndarray  # uint8 [10000, 28, 28]
  y_test: np.ndarray  # uint8 [10000]


class Fsdd(NamedTuple):
  """FSDD's clips, sorted by (speaker, digit, take), concatenated."""
  audio: np.ndarray  # int16 [total samples]
  offsets: np.ndarray  # int64 [clips + 1]: clip k = audio[o[k]:o[k + 1]]
  labels: np.ndarray  # uint8 [clips]: the digit
  takes: np.ndarray  # uint8 [clips]: the take (file name's index), 0-49


def read_npz(path: str, keys: Iterable[str]) -> dict[str, np.ndarray]:
  """``keys`` of the numpy archive ``path``, checked to be there."""
  with np.load(path) as npz:
    missing = [k for k in keys if k not in npz]
    if missing:
      raise ValueError(f"{path} lacks {missing} (it has {sorted(npz)}).\n"
                       f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
    return {k: npz[k] for k in keys}


# MNIST.


def load_mnist(manual_dir: str) -> Mnist:
  """MNIST from ``mnist.npz`` if present, else from the four idx files."""
  npz = os.path.join(manual_dir, "mnist.npz")
  if os.path.exists(npz):
    return Mnist(**read_npz(npz, Mnist._fields))
  paths = {key: _idx_path(manual_dir, name)
           for key, (name, _) in MNIST_FILES.items()}
  missing = [f"{MNIST_FILES[key][0]}.gz" for key, p in paths.items() if not p]
  if missing:
    raise FileNotFoundError(
        f"AV-MNIST needs MNIST in {manual_dir}: mnist.npz, or the four idx "
        f"files; missing {', '.join(missing)}.\n"
        f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  return read_mnist_idx(paths)


def _idx_path(manual_dir: str, name: str) -> str | None:
  """``name.gz`` or ``name`` (unpacked) in ``manual_dir``, or None."""
  for path in (os.path.join(manual_dir, f"{name}.gz"),
               os.path.join(manual_dir, name)):
    if os.path.exists(path):
      return path
  return None


def read_mnist_idx(paths: dict[str, str]) -> Mnist:
  """``Mnist`` from its four idx files, keyed by ``Mnist`` field."""
  arrays = {key: read_idx(paths[key], ndim)
            for key, (_, ndim) in MNIST_FILES.items()}
  for split in ("train", "test"):
    images, labels = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if len(images) != len(labels):
      raise ValueError(
          f"{paths[f'x_{split}']} has {len(images)} images but "
          f"{paths[f'y_{split}']} has {len(labels)} labels.")
  return Mnist(**arrays)


def read_idx(path: str, ndim: int) -> np.ndarray:
  """An idx file of unsigned bytes (gzipped if ``path`` ends in ``.gz``):
  magic ``00 00 08 ndim``, then ``ndim`` big-endian uint32 sizes, then the
  ``uint8`` array in C order (LeCun et al., the MNIST page)."""
  try:
    with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
      data = f.read()
  except (OSError, EOFError) as e:  # A truncated or corrupt gzip.
    raise ValueError(f"{path} cannot be read ({e}); download it again.") from e
  magic, header = bytes([0, 0, 8, ndim]), 4 + 4 * ndim
  if data[:4] != magic or len(data) < header:
    raise ValueError(f"{path} is not an idx file of {ndim}-d unsigned bytes: "
                     f"it starts {data[:4].hex()}, expected {magic.hex()}.")
  shape = struct.unpack(f">{ndim}I", data[4:header])
  if len(data) != header + math.prod(shape):
    raise ValueError(f"{path} holds {len(data) - header} bytes after its "
                     f"header, not the {math.prod(shape)} of shape "
                     f"{list(shape)}; download it again.")
  return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


# FSDD.


def load_fsdd(manual_dir: str) -> Fsdd:
  """FSDD from ``fsdd.npz`` if present, else from a ``recordings/`` folder
  (in ``manual_dir`` or one folder down), else from a zip holding one."""
  npz = os.path.join(manual_dir, "fsdd.npz")
  if os.path.exists(npz):
    return read_fsdd_npz(npz)
  names = sorted(os.listdir(manual_dir)) if os.path.isdir(manual_dir) else []
  folders = [os.path.join(manual_dir, d, "recordings") for d in ["", *names]]
  folders = [folder for folder in folders if _has_wavs(folder)]
  zips = [os.path.join(manual_dir, name) for name in names
          if name.endswith(".zip") and _zip_recordings(
              os.path.join(manual_dir, name))]
  found = folders or zips
  if not found:
    raise FileNotFoundError(
        f"AV-MNIST needs FSDD in {manual_dir}: fsdd.npz, a recordings/ folder "
        f"or a zip holding recordings/*.wav; it has none.\n"
        f"{MANUAL_DOWNLOAD_INSTRUCTIONS}")
  if len(found) > 1:
    raise ValueError(f"AV-MNIST found FSDD recordings in {found}; keep one.")
  if folders:
    return fsdd_from_clips(_folder_clips(found[0]))
  return fsdd_from_clips(_zip_clips(found[0]))


def read_fsdd_npz(path: str) -> Fsdd:
  """``Fsdd`` from a numpy archive (its ``repetition`` is ``takes``)."""
  f = read_npz(path, ("audio", "offsets", "labels", "repetition",
                      "sample_rate"))
  if int(f["sample_rate"]) != SAMPLE_RATE:
    raise ValueError(f"{path} sample_rate is {int(f['sample_rate'])}, "
                     f"expected {SAMPLE_RATE}.")
  return Fsdd(f["audio"], f["offsets"], f["labels"], f["repetition"])


def _has_wavs(folder: str) -> bool:
  return os.path.isdir(folder) and any(
      name.endswith(".wav") for name in os.listdir(folder))


def _folder_clips(folder: str) -> Iterator[tuple[str, np.ndarray]]:
  for name in sorted(os.listdir(folder)):
    if name.endswith(".wav"):
      path = os.path.join(folder, name)
      with open(path, "rb") as f:
        yield path, read_wav(f, path)


def _zip_recordings(path: str) -> list[str]:
  """The members of zip ``path`` that are wavs in a ``recordings/`` folder."""
  try:
    with zipfile.ZipFile(path) as z:
      return [m for m in z.namelist() if RECORDINGS_WAV.search(m)]
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path} is not a readable zip ({e}).") from e


def _zip_clips(path: str) -> Iterator[tuple[str, np.ndarray]]:
  with zipfile.ZipFile(path) as z:
    for member in _zip_recordings(path):
      name = f"{path}/{member}"
      yield name, read_wav(io.BytesIO(z.read(member)), name)


def read_wav(file, name: str) -> np.ndarray:
  """The ``int16 [samples]`` of a wav file object; ``name`` for errors.

  FSDD's wavs are 8 kHz mono 16-bit PCM; anything else is an error, never a
  conversion.
  """
  try:
    with wave.open(file, "rb") as w:
      rate, channels, width = (w.getframerate(), w.getnchannels(),
                               w.getsampwidth())
      frames = w.readframes(w.getnframes())
  except (wave.Error, EOFError) as e:
    raise ValueError(f"{name} is not a PCM wav file ({e}).") from e
  if (rate, channels, width) != (SAMPLE_RATE, 1, 2):
    raise ValueError(
        f"{name} is {rate} Hz, {channels} channel(s), {8 * width}-bit; FSDD's "
        f"recordings are {SAMPLE_RATE} Hz, 1 channel, 16-bit.")
  return np.frombuffer(frames, "<i2").astype(np.int16)


def fsdd_from_clips(clips: Iterable[tuple[str, np.ndarray]]) -> Fsdd:
  """``Fsdd`` from ``(file name, int16 samples)`` of each recording, in any
  order; the names end ``recordings/{digit}_{speaker}_{take}.wav``."""
  rows = []
  for name, samples in clips:
    match = RECORDING.search(name.replace(os.sep, "/"))
    if not match:
      raise ValueError(f"{name} is not named recordings/"
                       "{digit}_{speaker}_{take}.wav, as FSDD's are.")
    digit, speaker, take = match.groups()
    rows.append(((speaker, int(digit), int(take)), name, samples))
  rows.sort(key=lambda row: row[0])
  keys = [key for key, _, _ in rows]
  for (a, name_a, _), (b, name_b, _) in zip(rows, rows[1:]):
    if a == b:
      raise ValueError(f"{name_a} and {name_b} are the same recording.")
  lengths = [len(samples) for _, _, samples in rows]
  return Fsdd(
      audio=np.concatenate([samples for _, _, samples in rows]),
      offsets=np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
      labels=np.array([digit for _, digit, _ in keys], np.uint8),
      takes=np.array([take for _, _, take in keys], np.uint8))
