"""``mmjax.contrastive``: CLIP and SigLIP against plain NumPy, over the global
batch on 4 simulated devices, and the retrieval metrics."""

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P
import numpy as np
import pytest

from mmjax import contrastive


def _normalized(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _numpy_clip(image, text, log_scale):
  """Radford et al. 2021, Figure 3, in float64."""
  logits = _normalized(image) @ _normalized(text).T * np.exp(log_scale)
  def xent(l):  # Softmax cross-entropy of each row with its diagonal label.
    l = l - l.max(1, keepdims=True)
    return np.mean(np.log(np.exp(l).sum(1)) - np.diag(l))
  return (xent(logits) + xent(logits.T)) / 2


def _numpy_siglip(image, text, log_scale, bias):
  """Zhai et al. 2023, Algorithm 1, in float64."""
  logits = _normalized(image) @ _normalized(text).T * np.exp(log_scale) + bias
  labels = 2 * np.eye(len(image)) - 1
  return -np.sum(-np.logaddexp(0, -labels * logits)) / len(image)


def _pairs(seed, batch=8, dim=5):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(batch, dim)).astype(np.float32),
          rng.normal(size=(batch, dim)).astype(np.float32))


def test_clip_loss_equals_numpy():
  image, text = _pairs(0)
  for log_scale in (0.0, contrastive.CLIP_LOG_SCALE_INIT):
    np.testing.assert_allclose(
        contrastive.clip_loss(image, text, jnp.float32(log_scale)),
        _numpy_clip(image.astype(np.float64), text.astype(np.float64),
                    log_scale), rtol=1e-5)


def test_siglip_loss_equals_numpy():
  image, text = _pairs(1)
  for log_scale, bias in ((0.0, 0.0), (contrastive.SIGLIP_LOG_SCALE_INIT,
                                       contrastive.SIGLIP_BIAS_INIT)):
    np.testing.assert_allclose(
        contrastive.siglip_loss(image, text, jnp.float32(log_scale),
                                jnp.float32(bias)),
        _numpy_siglip(image.astype(np.float64), text.astype(np.float64),
                      log_scale, bias), rtol=1e-5)


def test_losses_are_symmetric_and_prefer_aligned_pairs():
  image, text = _pairs(2)
  scale = jnp.float32(2.0)
  clip = functools.partial(contrastive.clip_loss, log_scale=scale)
  siglip = functools.partial(contrastive.siglip_loss, log_scale=scale,
                             bias=jnp.float32(-1.0))
  for loss in (clip, siglip):
    np.testing.assert_allclose(loss(image, text), loss(text, image),
                               rtol=1e-6)
    # Texts equal to their images score lower than mismatched ones; the
    # embeddings' norms do not matter.
    assert loss(image, 3.0 * image) < loss(image, text)
    assert loss(image, 3.0 * image) < loss(image, np.roll(image, 1, axis=0))


def test_gradients_match_finite_differences_and_the_scale_learns():
  image, text = _pairs(3, batch=6, dim=4)
  image, text = image.astype(np.float64), text.astype(np.float64)
  with jax.enable_x64():
    for loss, args in ((contrastive.clip_loss, (0.5,)),
                       (contrastive.siglip_loss, (0.5, -1.0))):
      f = lambda x, *a: loss(x, jnp.asarray(text), *a)
      args = tuple(jnp.float64(a) for a in args)
      grads = jax.grad(f, argnums=tuple(range(1 + len(args))))(
          jnp.asarray(image), *args)
      assert all(np.all(np.isfinite(g)) for g in grads)
      eps = 1e-6
      direction = np.random.default_rng(0).normal(size=image.shape)
      numeric = (f(image + eps * direction, *args) -
                 f(image - eps * direction, *args)) / (2 * eps)
      np.testing.assert_allclose(np.sum(grads[0] * direction), numeric,
                                 rtol=1e-5)
      # On aligned pairs a larger scale sharpens the right answer: the
      # loss falls as the log-scale grows.
      aligned = jax.grad(lambda s: loss(jnp.asarray(image), jnp.asarray(image),
                                        s, *args[1:]))(args[0])
      assert aligned < 0


@pytest.mark.parametrize("loss_name, chunked, with_keys",
                         [("clip", False, False), ("siglip", False, False),
                          ("siglip", True, False), ("clip", False, True),
                          ("siglip", False, True), ("siglip", True, True)])
def test_global_batch_loss_over_devices_equals_one_device(loss_name, chunked,
                                                         with_keys):
  devices = jax.devices()[:4]
  assert len(devices) == 4
  image, text = _pairs(4, batch=16, dim=6)
  # Repeated texts across devices: keys 0-4 over 16 pairs.
  keys = np.arange(16)[:, None] % 5 if with_keys else None
  if loss_name == "clip":
    loss = lambda i, t, s, k, axis_name: contrastive.clip_loss(
        i, t, s, axis_name=axis_name, text_keys_BxK=k)
  else:
    loss = lambda i, t, s, k, axis_name: contrastive.siglip_loss(
        i, t, s, jnp.float32(-2.0), axis_name=axis_name, chunked=chunked,
        text_keys_BxK=k)
  scale = jnp.float32(1.5)
  value_and_grad = jax.value_and_grad(loss, argnums=(0, 1, 2))
  one_value, (one_image, one_text, one_scale) = value_and_grad(
      image, text, scale, keys, None)

  def per_device(i, t, s, k):
    value, (gi, gt, gs) = value_and_grad(i, t, s, k, "batch")
    # As steps.train_step does with parameter gradients: mean over devices.
    # The embeddings' gradients are per row; each device's rows get the
    # summed contributions of every device's copy of the loss.
    return (jax.lax.pmean(value, "batch"), gi / 4, gt / 4,
            jax.lax.pmean(gs, "batch"))

  mesh = Mesh(np.array(devices), ("batch",))
  sharded = jax.jit(jax.shard_map(
      per_device, mesh=mesh,
      in_specs=(P("batch"), P("batch"), P(), P("batch") if with_keys else P()),
      out_specs=(P(), P("batch"), P("batch"), P()), check_vma=False))
  value, grad_image, grad_text, grad_scale = sharded(image, text, scale, keys)
  np.testing.assert_allclose(value, one_value, rtol=1e-5)
  np.testing.assert_allclose(grad_scale, one_scale, rtol=1e-4)
  np.testing.assert_allclose(grad_image, one_image, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(grad_text, one_text, rtol=1e-4, atol=1e-6)


def _numpy_clip_with_positives(image, text, log_scale, positive):
  """CLIP's cross-entropy with each row's (column's) target spread evenly
  over its positives (UniCL), in float64."""
  logits = _normalized(image) @ _normalized(text).T * np.exp(log_scale)
  def xent(l, p):
    log_softmax = l - np.log(np.exp(l).sum(1, keepdims=True))
    return np.mean(-(p * log_softmax).sum(1) / p.sum(1))
  return (xent(logits, positive) + xent(logits.T, positive.T)) / 2


def test_repeated_texts_are_positives():
  image, text = _pairs(5, batch=8)
  keys = np.array([[0], [1], [0], [2], [3], [1], [4], [0]])
  positive = keys == keys.T
  image64, text64 = image.astype(np.float64), text.astype(np.float64)
  np.testing.assert_allclose(
      contrastive.clip_loss(image, text, jnp.float32(0.7), text_keys_BxK=keys),
      _numpy_clip_with_positives(image64, text64, 0.7, positive), rtol=1e-5)
  logits = _normalized(image64) @ _normalized(text64).T * np.exp(0.7) - 1.0
  labels = np.where(positive, 1.0, -1.0)
  np.testing.assert_allclose(
      contrastive.siglip_loss(image, text, jnp.float32(0.7), jnp.float32(-1.0),
                              text_keys_BxK=keys),
      np.sum(np.logaddexp(0, -labels * logits)) / 8, rtol=1e-5)
  # Keys that are all different give the papers' losses.
  unique = np.arange(8)[:, None] * 3
  for loss, args in ((contrastive.clip_loss, (0.7,)),
                     (contrastive.siglip_loss, (0.7, -1.0))):
    args = tuple(map(jnp.float32, args))
    np.testing.assert_allclose(loss(image, text, *args, text_keys_BxK=unique),
                               loss(image, text, *args), rtol=1e-6)


def test_clip_is_unchanged_by_positives_when_equal_texts_embed_equally():
  image, text = _pairs(6, batch=8)
  keys = np.array([[0], [1], [0], [2], [3], [1], [4], [0]])
  text = text[keys[:, 0]]  # Equal keys, equal embeddings.
  scale = jnp.float32(1.3)
  np.testing.assert_allclose(
      contrastive.clip_loss(image, text, scale, text_keys_BxK=keys),
      contrastive.clip_loss(image, text, scale), rtol=1e-6)
  assert not np.isclose(
      contrastive.siglip_loss(image, text, scale, jnp.float32(-1.0),
                              text_keys_BxK=keys),
      contrastive.siglip_loss(image, text, scale, jnp.float32(-1.0)))


def test_objective_reports_in_batch_accuracy_with_positives():
  eye = np.eye(4, dtype=np.float32)
  image, text = eye, eye[[1, 0, 2, 3]]  # Texts 0 and 1 swapped.
  params = {contrastive.LOGIT_SCALE: {"log_scale": jnp.float32(0.0)}}
  for positives, accuracy in (("pair", 0.5), ("same_text", 1.0)):
    objective = contrastive.Objective("clip", ("image", "caption"), positives)
    # Captions 0 and 1 are the same text.
    batch = {"caption": np.array([[3, 4], [3, 4], [5, 0], [6, 0]])}
    terms = objective({"image": image, "caption": text}, batch, params, None)
    assert float(terms["accuracy"]) == accuracy
    assert float(terms["logit_scale"]) == 1.0
    assert "logit_bias" not in terms


def test_split_metrics_on_hand_made_embeddings():
  eye = np.eye(4, dtype=np.float32)
  keys = np.array([[5], [5], [7], [9]])  # Pairs 0 and 1 share their text.
  image, text = eye, eye[[1, 0, 3, 2]]
  objective = contrastive.Objective("clip", ("image", "caption"))
  metrics = contrastive.split_metrics(
      image, text, keys, 0.0, 0.0, objective=objective,
      prompts_CxD=eye[[2, 3]], prompt_keys_CxK=np.array([[7], [9]]))
  # Images 0 and 1 find a text identical to theirs; 2 and 3 the other's.
  assert metrics["recall@1/image_to_text"] == 0.5
  assert metrics["recall@1/text_to_image"] == 0.5
  assert metrics["recall@5/image_to_text"] == 1.0
  # Images 2 and 3 have a prompt's text and are closest to that prompt.
  assert metrics["accuracy/zero_shot"] == 1.0
  ids = np.array([[0], [0], [1], [2]])
  np.testing.assert_allclose(metrics["loss"], contrastive.clip_loss(
      image, text, jnp.float32(0.0), text_keys_BxK=ids), rtol=1e-6)
  # No image has a prompt's text: no zero-shot accuracy.
  assert "accuracy/zero_shot" not in contrastive.split_metrics(
      image, text, keys, 0.0, 0.0, objective=objective,
      prompts_CxD=eye[[2]], prompt_keys_CxK=np.array([[8]]))


def test_recall_at_k_on_a_hand_made_matrix():
  similarity = np.array([[0.9, 0.1, 0.0],    # Query 0: its match is first.
                         [0.8, 0.5, 0.7],    # Query 1: its match is third.
                         [0.2, 0.6, 0.6]])   # Query 2: tied with a negative.
  assert contrastive.recall_at_k(similarity, 1) == pytest.approx(1 / 3)
  assert contrastive.recall_at_k(similarity, 2) == pytest.approx(2 / 3)
  assert contrastive.recall_at_k(similarity, 3) == 1.0
  # Text to image: the columns' view.
  assert contrastive.recall_at_k(similarity.T, 1) == pytest.approx(1 / 3)
  # A model that scores everything alike retrieves nothing at k < 3.
  assert contrastive.recall_at_k(np.ones((3, 3)), 2) == 0.0
  # Several positives: the best one counts.
  positives = np.array([[1, 0, 0], [1, 1, 0], [0, 0, 1]], bool)
  assert contrastive.recall_at_k(similarity, 1, positives) == pytest.approx(
      2 / 3)
  with pytest.raises(ValueError, match="needs positives"):
    contrastive.recall_at_k(np.zeros((2, 3)), 1)


def test_zero_shot_accuracy_picks_the_most_similar_prompt():
  prompts = np.array([[1.0, 0.0], [0.0, 1.0]])
  images = np.array([[5.0, 1.0], [0.2, 3.0], [1.0, 0.9]])
  assert contrastive.zero_shot_accuracy(images, prompts, [0, 1, 0]) == 1.0
  assert contrastive.zero_shot_accuracy(images, prompts, [1, 1, 1]) == (
      pytest.approx(1 / 3))
