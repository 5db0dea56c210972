"""Optimisers and learning-rate schedules (``mmjax.optim``) against updates
worked out by hand, starting from the AV-MNIST recipe
(``experiments/avmnist.py``: SGD, learning rate 0.1, constant schedule, weight
decay 1e-4, clipping at global norm 8)."""

import jax
import numpy as np
import pytest

from mmjax import optim
from e2e import load_experiment


def _avmnist_optim(**changes):
  """``config.optim`` of ``experiments/avmnist.py``, with ``changes``."""
  config = load_experiment("avmnist").get_config("").optim
  config.update(changes)
  return config


def _lr(schedule, steps):
  return [float(schedule(np.int32(s))) for s in steps]


def test_the_avmnist_recipe_is_what_these_tests_start_from():
  config = _avmnist_optim()
  assert (config.name, config.schedule, config.learning_rate) == (
      "sgd", "constant", 0.1)
  assert (config.warmup_steps, config.momentum) == (0, 0.0)
  assert (config.weight_decay, config.grad_clip_norm) == (1e-4, 8.0)


def test_constant_schedule_without_warmup_is_the_learning_rate_from_step_0():
  schedule = optim.make_schedule(_avmnist_optim(), total_steps=100)
  np.testing.assert_allclose(_lr(schedule, [0, 1, 99, 10_000]), [0.1] * 4,
                             rtol=1e-7)


def test_constant_schedule_warms_up_linearly_from_0():
  schedule = optim.make_schedule(
      _avmnist_optim(learning_rate=0.2, warmup_steps=4), total_steps=100)
  # lr * step / warmup until step 4, then lr.
  np.testing.assert_allclose(_lr(schedule, range(7)),
                             [0.0, 0.05, 0.1, 0.15, 0.2, 0.2, 0.2], rtol=1e-6)


def test_step_schedule_multiplies_by_the_factor_from_each_decay_step_on():
  schedule = optim.make_schedule(
      _avmnist_optim(schedule="step", decay_steps=(3, 5), decay_factor=0.1),
      total_steps=100)
  # 0.1 before step 3; 0.1 * 0.1 at steps 3-4; 0.1 * 0.1 * 0.1 from step 5.
  np.testing.assert_allclose(_lr(schedule, [0, 2, 3, 4, 5, 6, 1000]),
                             [0.1, 0.1, 0.01, 0.01, 0.001, 0.001, 0.001],
                             rtol=1e-6)


def test_step_schedule_warms_up_and_keeps_its_decay_steps_absolute():
  schedule = optim.make_schedule(
      _avmnist_optim(schedule="step", warmup_steps=4, decay_steps=(6,),
                     decay_factor=0.5), total_steps=100)
  # lr * step / 4 during warmup, lr until step 6, then lr * 0.5.
  np.testing.assert_allclose(_lr(schedule, [0, 2, 4, 5, 6, 50]),
                             [0.0, 0.05, 0.1, 0.1, 0.05, 0.05], rtol=1e-6)


def test_step_schedule_refuses_unsorted_or_repeated_decay_steps():
  for decay_steps in [(5, 3), (3, 3)]:
    with pytest.raises(ValueError, match="decay_steps must be increasing"):
      optim.make_schedule(
          _avmnist_optim(schedule="step", decay_steps=decay_steps), 10)


def test_unknown_names_list_the_valid_ones():
  with pytest.raises(ValueError, match="Unknown schedule 'cosine'.*constant"):
    optim.make_schedule(_avmnist_optim(schedule="cosine"), 10)
  schedule = optim.make_schedule(_avmnist_optim(), 10)
  with pytest.raises(ValueError, match="Unknown optimizer 'adam'. Valid optimizer names: adamw, sgd"):
    optim.make_optimizer(_avmnist_optim(name="adam"), schedule)


# SGD on a small tree: a kernel (rank 2, decayed), a bias and a scalar (not
# decayed), three steps with different gradients.
PARAMS = {"dense": {"kernel": np.array([[1.0, -2.0, 0.5], [3.0, 0.0, -1.0]]),
                    "bias": np.array([0.5, -0.5, 2.0])},
          "scale": np.array(1.5)}
RNG = np.random.default_rng(0)
GRADS = [jax.tree.map(lambda p: RNG.normal(size=np.shape(p)), PARAMS)
         for _ in range(3)]


def _norm(tree) -> float:
  return float(np.sqrt(sum(np.sum(np.square(x))
                           for x in jax.tree.leaves(tree))))


def _run(config, grads):
  """The parameters after each of ``grads``, by ``mmjax.optim``."""
  tx = optim.make_optimizer(config, optim.make_schedule(config, len(grads)))
  params = jax.tree.map(lambda p: np.asarray(p, np.float32), PARAMS)
  state, out = tx.init(params), []
  update = jax.jit(tx.update)
  for g in grads:
    updates, state = update(jax.tree.map(np.float32, g), state, params)
    params = jax.tree.map(lambda p, u: p + u, params, updates)
    out.append(jax.tree.map(np.asarray, params))
  return out


def _by_hand(grads, lrs, *, momentum, weight_decay, clip):
  """SGD in float64, one leaf at a time: ``g`` clipped to global norm
  ``clip`` (0: none), plus ``weight_decay * p`` for leaves of rank >= 2, into
  the momentum trace ``v = g + momentum * v`` (``v = g`` without momentum),
  then ``p -= lr * v``."""
  params = jax.tree.map(np.copy, PARAMS)
  leaves, treedef = jax.tree.flatten(params)
  trace = [np.zeros_like(p) for p in leaves]
  out = []
  for g, lr in zip(grads, lrs, strict=True):
    norm, g = _norm(g), jax.tree.leaves(g)
    if clip and norm > clip:
      g = [x * clip / norm for x in g]
    for i, (p, x) in enumerate(zip(leaves, g, strict=True)):
      x = x + (weight_decay * p if p.ndim >= 2 else 0.0)
      trace[i] = x + momentum * trace[i]
      leaves[i] = p - lr * trace[i]
    out.append(jax.tree.unflatten(treedef, list(leaves)))
  return out


def _assert_close(got, want):
  assert len(got) == len(want)
  for step, (a, b) in enumerate(zip(got, want)):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(
        x, y, rtol=1e-5, atol=1e-6, err_msg=f"after step {step + 1}"), a, b)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgd_matches_the_update_by_hand(momentum, weight_decay):
  # The step schedule too: lr 0.1, then 0.05 from the second update on.
  config = _avmnist_optim(momentum=momentum, weight_decay=weight_decay,
                          grad_clip_norm=0.0, schedule="step",
                          decay_steps=(1,), decay_factor=0.5)
  got = _run(config, GRADS)
  _assert_close(got, _by_hand(GRADS, [0.1, 0.05, 0.05], momentum=momentum,
                              weight_decay=weight_decay, clip=0.0))
  # The hand computation is sensitive to each setting: leaving one out
  # changes the result.
  if momentum:
    with pytest.raises(AssertionError):
      _assert_close(got, _by_hand(GRADS, [0.1, 0.05, 0.05], momentum=0.0,
                                  weight_decay=weight_decay, clip=0.0))
  if weight_decay:
    with pytest.raises(AssertionError):
      _assert_close(got, _by_hand(GRADS, [0.1, 0.05, 0.05], momentum=momentum,
                                  weight_decay=0.0, clip=0.0))


def test_sgd_with_weight_decay_shrinks_kernels_only():
  config = _avmnist_optim(weight_decay=0.5, grad_clip_norm=0.0)
  (after,) = _run(config, [jax.tree.map(np.zeros_like, PARAMS)])
  # No gradient: kernel -= 0.1 * 0.5 * kernel; bias and scale stay.
  np.testing.assert_allclose(after["dense"]["kernel"],
                             0.95 * PARAMS["dense"]["kernel"], rtol=1e-6)
  np.testing.assert_array_equal(after["dense"]["bias"], PARAMS["dense"]["bias"])
  np.testing.assert_array_equal(after["scale"], PARAMS["scale"])


def test_the_avmnist_recipe_clips_the_gradient_to_global_norm_8():
  # Step 1's gradient has global norm 40 (clipped to 8), step 2's is small.
  big = jax.tree.map(lambda g: g * 40.0 / _norm(GRADS[0]), GRADS[0])
  grads = [big, GRADS[1]]
  got = _run(_avmnist_optim(), grads)
  _assert_close(got, _by_hand(grads, [0.1, 0.1], momentum=0.0,
                              weight_decay=1e-4, clip=8.0))
  # The first step moved the parameters by lr * 8 (plus the tiny decay).
  moved = jax.tree.map(lambda a, p: a - p, got[0], PARAMS)
  np.testing.assert_allclose(_norm(moved), 0.1 * 8.0, rtol=1e-3)
  # Clipping comes before weight decay: with a large decay, the decay term
  # is added to the clipped gradient, not clipped with it.
  _assert_close(_run(_avmnist_optim(weight_decay=0.5), grads),
                _by_hand(grads, [0.1, 0.1], momentum=0.0, weight_decay=0.5,
                         clip=8.0))
