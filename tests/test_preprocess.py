"""Preprocessing ops, the pipeline-string parser, the one-field op decorator
and the tokenizer."""

import numpy as np
import pytest

from mmjax.data import preprocess
from mmjax.data.tokenizer import Vocabulary


def _batch(n=4):
  rng = np.random.default_rng(0)
  return {"image": rng.integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
          "question": np.array([b"is there a red circle?",
                                b"how many shapes are there?",
                                b"what color is the square?",
                                b"zebra"][:n]),
          "answer": np.arange(n)}


def _build(spec, vocabularies=None):
  return preprocess.build_pp(preprocess.parse_pp(spec), vocabularies)


def test_parse_pp_reads_ops_and_arguments():
  ops = preprocess.parse_pp("normalize(key='image', mean=0.5)|keep(keys=('a',))|keep")
  assert ops == [("normalize", {"key": "image", "mean": 0.5}),
                 ("keep", {"keys": ("a",)}), ("keep", {})]
  assert ops[0].name == "normalize" and ops[0].kwargs == {"key": "image",
                                                           "mean": 0.5}


def test_unknown_op_lists_valid_names():
  with pytest.raises(ValueError, match=r"Unknown preprocessing op 'nope'.*normalize"):
    preprocess.parse_pp("normalize(key='image')|nope(x=1)")


@pytest.mark.parametrize("spec", ["tokenize(max_len=8)", "tokenize",
                                  "normalize(mean=0.5)", "flip_left_right"])
def test_an_op_without_key_is_an_error(spec):
  """No op defaults the field it reads (a text key, e.g., comes from the
  pipeline string, never a default like "question")."""
  with pytest.raises(ValueError, match=r"missing a required argument: 'key'"):
    preprocess.parse_pp(spec)


def test_tokenize_without_key_is_an_error_when_called_directly():
  with pytest.raises(TypeError, match="key"):
    preprocess.tokenize(max_len=8, vocabularies={})


def test_an_unknown_argument_names_the_op_and_its_arguments():
  with pytest.raises(ValueError, match=r"normalize\(key='image', sdt=1\).*"
                     r"unexpected keyword argument 'sdt'.*normalize takes: "
                     r"key, out_key, mean, std\."):
    preprocess.parse_pp("normalize(key='image', sdt=1)")


def test_text_keys_are_the_tokenized_fields_once_each_in_order():
  ops = preprocess.parse_pp(
      "normalize(key='image')|tokenize(key='caption')|"
      "tokenize(key='question', max_len=4)|tokenize(key='caption')")
  assert preprocess.text_keys(ops) == ["caption", "question"]
  assert preprocess.text_keys(preprocess.parse_pp("normalize(key='image')")) == []


def test_malformed_op_says_how_to_write_it():
  with pytest.raises(ValueError, match="name\\(key=value"):
    preprocess.parse_pp("normalize(key=image)")


def test_vocabulary_orders_by_frequency_and_pads():
  vocab = Vocabulary.from_texts([b"a b b", "B c?"])
  assert vocab.words == ["b", "a", "c"]
  assert vocab.size == 5
  np.testing.assert_array_equal(vocab.encode("b zzz a", 5), [2, 1, 3, 0, 0])
  np.testing.assert_array_equal(vocab.encode("a a a a a a", 3), [3, 3, 3])


def test_vocabulary_save_load_roundtrip(tmp_path):
  vocab = Vocabulary.from_texts(["x y y"])
  vocab.save(str(tmp_path / "v" / "q.json"))
  assert Vocabulary.load(str(tmp_path / "v" / "q.json")).words == vocab.words


def test_pipeline_normalizes_tokenizes_and_keeps():
  batch = _batch()
  vocab = Vocabulary.from_texts(batch["question"][:3])
  pp = _build(
      "normalize(key='image', mean=0.0, std=1.0)|tokenize(key='question', max_len=6)"
      "|keep(keys=('image', 'question', 'question_mask', 'answer'))",
      {"question": vocab})
  out = pp(batch, np.random.default_rng(0))
  assert set(out) == {"image", "question", "question_mask", "answer"}
  assert out["image"].dtype == np.float32 and out["image"].max() <= 1.0
  np.testing.assert_allclose(out["image"], batch["image"] / 255.0, rtol=1e-6)
  assert out["question"].shape == (4, 6) and out["question"].dtype == np.int32
  np.testing.assert_array_equal(out["question_mask"].sum(1), [5, 5, 5, 1])
  assert out["question"][3, 0] == Vocabulary.unk_id


def test_tokenize_without_vocabulary_names_the_key():
  with pytest.raises(ValueError, match="tokenize\\(key='caption'\\) has no vocabulary"):
    _build("tokenize(key='caption')", {})


@preprocess.field_op
def _add(amount=1):
  """A one-field op for the tests: ``x + amount``."""
  return lambda x, rng: x + amount


def test_field_op_overwrites_its_key_by_default():
  batch = {"a": np.arange(3), "b": np.zeros(2)}
  out = _add("a", amount=2)(batch, np.random.default_rng(0))
  assert out.keys() == batch.keys()
  np.testing.assert_array_equal(out["a"], [2, 3, 4])
  assert out["b"] is batch["b"]
  np.testing.assert_array_equal(batch["a"], [0, 1, 2])  # Not written in place.


def test_field_op_with_out_key_writes_a_new_field_and_leaves_its_input():
  batch = {"a": np.arange(3)}
  out = _add("a", out_key="c", amount=2)(batch, np.random.default_rng(0))
  assert set(out) == {"a", "c"}
  assert out["a"] is batch["a"]
  np.testing.assert_array_equal(out["c"], [2, 3, 4])


def test_a_registered_op_takes_out_key_from_the_pipeline_string():
  batch = _batch()
  out = _build("normalize(key='image', out_key='pixels', mean=0.0, std=1.0)")(
      batch, np.random.default_rng(0))
  assert set(out) == set(batch) | {"pixels"}
  np.testing.assert_array_equal(out["image"], batch["image"])
  np.testing.assert_allclose(out["pixels"], batch["image"] / 255.0, rtol=1e-6)


def test_field_op_passes_the_rng_to_random_ops():
  x = np.arange(8 * 4 * 4, dtype=np.float32).reshape(8, 4, 4, 1)
  flip = preprocess.flip_left_right("image", out_key="flipped")
  a = flip({"image": x}, np.random.default_rng(1))["flipped"]
  np.testing.assert_array_equal(
      a, flip({"image": x}, np.random.default_rng(1))["flipped"])
  assert not np.array_equal(
      a, flip({"image": x}, np.random.default_rng(2))["flipped"])


def _translated(x_HxWxC, dy, dx):
  """``x`` moved down by ``dy`` and right by ``dx`` pixels (negative: up,
  left), zeros where nothing moved in."""
  h, w = x_HxWxC.shape[:2]
  out = np.zeros_like(x_HxWxC)
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
      x_HxWxC[max(-dy, 0):h - max(dy, 0), max(-dx, 0):w - max(dx, 0)]
  return out


def test_translated_moves_a_known_pixel():
  x = np.zeros((4, 5, 1), np.uint8)
  x[1, 2] = 9
  assert np.argwhere(_translated(x, 2, -1)[..., 0]).tolist() == [[3, 1]]
  assert not _translated(x, 3, 0).any()  # Moved out of the image.


def test_random_crop_translates_each_example_by_at_most_pad_and_is_seeded():
  pad, n = 2, 32
  # Distinct non-zero pixels everywhere: one shift explains each output.
  x = np.random.default_rng(0).integers(1, 256, (n, 6, 7, 2), dtype=np.uint8)
  op = preprocess.random_crop(key="image", pad=pad)
  a = op({"image": x}, np.random.default_rng(3))["image"]
  np.testing.assert_array_equal(
      a, op({"image": x}, np.random.default_rng(3))["image"])
  assert a.shape == x.shape and a.dtype == x.dtype
  shifts = []
  for out, image in zip(a, x, strict=True):
    (shift,) = [(dy, dx) for dy in range(-pad, pad + 1)
                for dx in range(-pad, pad + 1)
                if np.array_equal(out, _translated(image, dy, dx))]
    shifts.append(shift)
  # Not the identity: examples move, by different shifts (of the 25 possible,
  # 32 draws hit ~18), and both ways on each axis.
  assert sum(s != (0, 0) for s in shifts) > n // 2, shifts
  assert len(set(shifts)) >= 10, shifts
  for axis in (0, 1):
    assert {np.sign(s[axis]) for s in shifts} == {-1, 0, 1}, shifts
  # Another seed, other shifts.
  assert not np.array_equal(
      a, op({"image": x}, np.random.default_rng(4))["image"])


def test_flip_mirrors_some_examples():
  x = np.arange(8 * 4 * 4, dtype=np.float32).reshape(8, 4, 4, 1)
  out = preprocess.flip_left_right("image")({"image": x}, np.random.default_rng(0))["image"]
  flipped = [np.array_equal(o, xi[:, ::-1]) for o, xi in zip(out, x)]
  kept = [np.array_equal(o, xi) for o, xi in zip(out, x)]
  assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_blur_preserves_constant_images_and_smooths_edges():
  x = np.full((1, 8, 8, 1), 3.0, np.float32)
  op = preprocess.blur("image", sigma=1.0)
  np.testing.assert_allclose(op({"image": x}, None)["image"], x, rtol=1e-5)
  edge = np.zeros((1, 8, 8, 1), np.float32)
  edge[:, :, 4:] = 1.0
  out = op({"image": edge}, None)["image"]
  assert 0.0 < out[0, 0, 3, 0] < 0.5 < out[0, 0, 4, 0] < 1.0


def test_spectrogram_finds_the_tone():
  rate, tone = 8000, 1000
  t = np.arange(4000) / rate
  wave = np.sin(2 * np.pi * tone * t)[None].astype(np.float32)
  out = preprocess.spectrogram("audio", frame_length=256, frame_step=128)(
      {"audio": wave}, None)["audio"]
  assert out.shape == (1, 30, 129, 1)
  assert np.argmax(out[0, 10, :, 0]) == round(tone / rate * 256)
