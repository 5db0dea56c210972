"""AV-MNIST's sources, read from the files users download.

Tiny MNIST idx files and FSDD wavs (a ``recordings/`` folder, a clone, a zip)
are written here next to numpy archives of the same data and must read back
as the same arrays; bad or missing files must be named. With the shared
archives present, the full sources are rewritten in the downloaded forms and
must build byte-identical examples.
"""

import gzip
import io
import pathlib
import struct
import wave
import zipfile

import numpy as np
import pytest
import tensorflow_datasets as tfds

from mmjax.data import avmnist as av
from mmjax.data import avmnist_sources as sources

RAW = pathlib.Path(__file__).resolve().parents[2] / "shared/data/avmnist_raw"
# Tiny FSDD clips, in the order the archive holds them: by speaker, then
# digit, then take as a number (so take 2 before take 10).
FSDD_ORDER = ("0_alice_0.wav", "3_alice_2.wav", "3_alice_10.wav",
              "9_alice_1.wav", "3_bob_0.wav", "7_bob_49.wav")


def write_idx(path, array):
  """An idx file of ``uint8`` ``array``, gzipped (fast) if ``path`` ends in
  .gz."""
  data = (bytes([0, 0, 8, array.ndim]) +
          struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes())
  if str(path).endswith(".gz"):
    data = gzip.compress(data, compresslevel=1)
  pathlib.Path(path).write_bytes(data)


def wav_bytes(samples, rate=8000, channels=1):
  """A 16-bit PCM wav of ``int16 [frames * channels]`` samples."""
  buffer = io.BytesIO()
  with wave.open(buffer, "wb") as w:
    w.setnchannels(channels)
    w.setsampwidth(2)
    w.setframerate(rate)
    w.writeframes(samples.astype("<i2").tobytes())
  return buffer.getvalue()


def tiny_mnist(seed=0) -> sources.Mnist:
  rng = np.random.default_rng(seed)
  return sources.Mnist(
      rng.integers(0, 256, (5, 28, 28), np.uint8),
      rng.integers(0, 10, 5, np.uint8),
      rng.integers(0, 256, (3, 28, 28), np.uint8),
      rng.integers(0, 10, 3, np.uint8))


def tiny_clips(seed=0) -> dict[str, np.ndarray]:
  """File name -> ``int16`` samples, full scale included."""
  rng = np.random.default_rng(seed)
  clips = {name: rng.integers(-32768, 32768, rng.integers(5, 40), np.int16)
           for name in FSDD_ORDER}
  clips[FSDD_ORDER[0]][:2] = (-32768, 32767)
  return clips


def write_mnist_downloads(folder, mnist, suffix=".gz"):
  folder.mkdir(parents=True, exist_ok=True)
  for key, (name, _) in sources.MNIST_FILES.items():
    write_idx(folder / f"{name}{suffix}", getattr(mnist, key))


def write_fsdd_npz(path, clips):
  """``fsdd.npz`` as the shared folder's README specifies it."""
  path.parent.mkdir(parents=True, exist_ok=True)
  ordered = [clips[name] for name in FSDD_ORDER]
  np.savez_compressed(
      path, audio=np.concatenate(ordered),
      offsets=np.cumsum([0] + [len(c) for c in ordered]).astype(np.int64),
      labels=np.array([int(n.split("_")[0]) for n in FSDD_ORDER], np.uint8),
      repetition=np.array([int(n[:-4].split("_")[2]) for n in FSDD_ORDER],
                          np.uint8),
      sample_rate=np.int32(8000))


def write_recordings(folder, clips):
  """The wavs, written in reverse order (readers must sort them)."""
  folder.mkdir(parents=True)
  for name in sorted(clips, reverse=True):
    (folder / name).write_bytes(wav_bytes(clips[name]))


def write_zip(path, clips, prefix="free-spoken-digit-dataset-master/"):
  """The repository as GitHub zips it: one top folder, more than wavs."""
  path.parent.mkdir(parents=True, exist_ok=True)
  with zipfile.ZipFile(path, "w") as z:
    z.writestr(f"{prefix}README.md", "FSDD")
    z.writestr(f"{prefix}acquire_data/notes.wav", wav_bytes(np.zeros(3)))
    for name in sorted(clips, reverse=True):
      z.writestr(f"{prefix}recordings/{name}", wav_bytes(clips[name]))


def assert_same_arrays(actual, expected):
  assert type(actual) is type(expected)
  for name, a, b in zip(expected._fields, actual, expected):
    assert a.dtype == b.dtype and a.shape == b.shape, (name, a.dtype, b.dtype)
    np.testing.assert_array_equal(a, b, err_msg=name)


def test_idx_files_read_as_the_mnist_archive(tmp_path):
  mnist = tiny_mnist()
  (tmp_path / "npz").mkdir()
  np.savez_compressed(tmp_path / "npz/mnist.npz", **mnist._asdict())
  write_mnist_downloads(tmp_path / "gz", mnist)
  write_mnist_downloads(tmp_path / "unpacked", mnist, suffix="")
  from_npz = sources.load_mnist(str(tmp_path / "npz"))
  assert_same_arrays(from_npz, mnist)
  for form in ("gz", "unpacked"):
    assert_same_arrays(sources.load_mnist(str(tmp_path / form)), from_npz)


def test_recordings_and_zips_read_as_the_fsdd_archive(tmp_path):
  clips = tiny_clips()
  write_fsdd_npz(tmp_path / "npz/fsdd.npz", clips)
  write_recordings(tmp_path / "folder/recordings", clips)
  write_recordings(tmp_path / "clone/free-spoken-digit-dataset/recordings",
                   clips)
  write_zip(tmp_path / "zip/free-spoken-digit-dataset-master.zip", clips)
  write_zip(tmp_path / "flat_zip/fsdd.zip", clips, prefix="")
  from_npz = sources.load_fsdd(str(tmp_path / "npz"))
  np.testing.assert_array_equal(from_npz.labels, [0, 3, 3, 9, 3, 7])
  np.testing.assert_array_equal(from_npz.takes, [0, 2, 10, 1, 0, 49])
  for form in ("folder", "clone", "zip", "flat_zip"):
    assert_same_arrays(sources.load_fsdd(str(tmp_path / form)), from_npz)


def test_the_archives_are_read_before_the_downloads(tmp_path):
  np.savez_compressed(tmp_path / "mnist.npz", **tiny_mnist(0)._asdict())
  write_fsdd_npz(tmp_path / "fsdd.npz", tiny_clips(0))
  write_mnist_downloads(tmp_path, tiny_mnist(1))
  write_zip(tmp_path / "fsdd.zip", tiny_clips(1))
  assert_same_arrays(sources.load_mnist(str(tmp_path)), tiny_mnist(0))
  np.testing.assert_array_equal(sources.load_fsdd(str(tmp_path)).audio,
                                np.concatenate(list(
                                    tiny_clips(0)[n] for n in FSDD_ORDER)))


def test_missing_files_are_named_with_where_to_get_them(tmp_path):
  with pytest.raises(FileNotFoundError, match=(
      r"(?s)mnist\.npz.*missing train-images-idx3-ubyte\.gz, "
      r"train-labels-idx1-ubyte\.gz, t10k-images-idx3-ubyte\.gz, "
      r"t10k-labels-idx1-ubyte\.gz\..*https://yann\.lecun\.com/exdb/mnist/"
      r".*https://storage\.googleapis\.com/cvdf-datasets/mnist/")):
    sources.load_mnist(str(tmp_path))
  with pytest.raises(FileNotFoundError, match=(
      r"(?s)needs FSDD in .*fsdd\.npz, a recordings/ folder or a zip.*"
      r"https://github\.com/Jakobovski/free-spoken-digit-dataset/archive/")):
    sources.load_fsdd(str(tmp_path))
  write_mnist_downloads(tmp_path, tiny_mnist())
  (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
  with pytest.raises(FileNotFoundError,
                     match=r"missing t10k-labels-idx1-ubyte\.gz\.\n"):
    sources.load_mnist(str(tmp_path))


def _bad_wav_rate(folder):
  write_recordings(folder / "recordings", tiny_clips())
  (folder / "recordings/3_bob_0.wav").write_bytes(
      wav_bytes(np.zeros(10, np.int16), rate=16000))


def _bad_wav_channels(folder):
  write_zip(folder / "fsdd.zip", tiny_clips())
  with zipfile.ZipFile(folder / "fsdd.zip", "a") as z:
    z.writestr("recordings/5_bob_0.wav", wav_bytes(np.zeros(10), channels=2))


def _bad_wav_name(folder):
  write_recordings(folder / "recordings", tiny_clips())
  (folder / "recordings/three_bob_1.wav").write_bytes(
      wav_bytes(np.zeros(10, np.int16)))


def _two_recordings(folder):
  write_recordings(folder / "recordings", tiny_clips())
  write_recordings(folder / "fsdd/recordings", tiny_clips())


def _bad_zip(folder):
  (folder / "fsdd.zip").write_bytes(b"not a zip")


def _bad_idx_magic(folder):
  write_mnist_downloads(folder, tiny_mnist())
  write_idx(folder / "t10k-images-idx3-ubyte.gz", tiny_mnist().y_test)


def _bad_idx_truncated(folder):
  write_mnist_downloads(folder, tiny_mnist())
  path = folder / "train-images-idx3-ubyte.gz"
  path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-1]))


def _bad_idx_counts(folder):
  write_mnist_downloads(folder, tiny_mnist())
  write_idx(folder / "train-labels-idx1-ubyte.gz", tiny_mnist().y_test)


@pytest.mark.parametrize("write, load, message", [
    pytest.param(
        _bad_wav_rate, sources.load_fsdd,
        r"3_bob_0\.wav is 16000 Hz, 1 channel\(s\), 16-bit; FSDD's "
        r"recordings are 8000 Hz", id="wav_rate"),
    pytest.param(
        _bad_wav_channels, sources.load_fsdd,
        r"fsdd\.zip/recordings/5_bob_0\.wav is 8000 Hz, 2 channel\(s\)",
        id="wav_channels"),
    pytest.param(
        _bad_wav_name, sources.load_fsdd,
        r"three_bob_1\.wav is not named recordings/\{digit\}_", id="wav_name"),
    pytest.param(
        _two_recordings, sources.load_fsdd,
        r"found FSDD recordings in .*/recordings', .*/fsdd/recordings'\]; "
        r"keep one", id="two_recordings"),
    pytest.param(
        _bad_zip, sources.load_fsdd, r"fsdd\.zip is not a readable zip",
        id="bad_zip"),
    pytest.param(
        _bad_idx_magic, sources.load_mnist,
        r"t10k-images-idx3-ubyte\.gz is not an idx file of 3-d unsigned "
        r"bytes: it starts 00000801, expected 00000803", id="idx_magic"),
    pytest.param(
        _bad_idx_truncated, sources.load_mnist,
        r"holds 3919 bytes after its header, not the 3920 of shape "
        r"\[5, 28, 28\]", id="idx_truncated"),
    pytest.param(
        _bad_idx_counts, sources.load_mnist,
        r"train-images-idx3-ubyte\.gz has 5 images but .*"
        r"train-labels-idx1-ubyte\.gz has 3 labels", id="idx_counts"),
])
def test_bad_files_are_named(tmp_path, write, load, message):
  write(tmp_path)
  with pytest.raises(ValueError, match=message):
    load(str(tmp_path))


class DownloadedAvmnist(av.Avmnist):
  """``avmnist`` with 200 examples a split, registered under its own name."""
  name = "downloaded_avmnist"
  SPLIT_SIZES = {split: 200 for split in av.FIRST_200_CHECKSUMS}


def write_full_downloads(folder):
  """The shared archives rewritten as MNIST's idx files and FSDD's zip."""
  with np.load(RAW / "mnist.npz") as mnist:
    write_mnist_downloads(folder, sources.Mnist(**mnist))
  with np.load(RAW / "fsdd.npz") as fsdd:
    audio, offsets = fsdd["audio"], fsdd["offsets"]
    with zipfile.ZipFile(folder / "fsdd.zip", "w") as z:
      for k, name in enumerate(fsdd["filenames"]):
        z.writestr(f"fsdd-{sources.FSDD_COMMIT}/recordings/{name}",
                   wav_bytes(audio[offsets[k]:offsets[k + 1]]))


@pytest.mark.skipif(not RAW.is_dir(),
                    reason=f"AV-MNIST raw data not found at {RAW}")
def test_the_downloads_build_the_examples_the_archives_build(tmp_path):
  # The arrays are the archives'; the build from them (one PCA fit, ~5-20 s)
  # gives the examples recorded from the archives' build.
  downloads = tmp_path / "downloads"
  downloads.mkdir()
  write_full_downloads(downloads)
  assert_same_arrays(av.load_raw(str(downloads)), av.load_raw(str(RAW)))
  DownloadedAvmnist(data_dir=tmp_path / "tfds").download_and_prepare(
      file_format="array_record",
      download_config=tfds.download.DownloadConfig(manual_dir=str(downloads)))
  for split, digest in av.FIRST_200_CHECKSUMS.items():
    assert av.checksum(tfds.data_source(
        "downloaded_avmnist", data_dir=tmp_path / "tfds", split=split)) == (
            digest), split
