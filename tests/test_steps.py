"""The pure train step: non-finite updates are caught or skipped."""

import functools

import jax
import numpy as np
import pytest

from mmjax import losses, models, optim, steps, train

from helpers import small_film_batches, small_film_config


def _config():
  """``helpers.small_film_config`` (``test_parallel``'s model) without its
  question: what is tested here does not depend on the model, and the LSTM
  and FiLM took half the compile time."""
  config = small_film_config()
  config.model.modalities = ("image",)
  del config.model.encoders["question"]
  config.model.fusion = dict(name="concat", hidden=(16,))
  return config


def _setup(skip):
  config = _config()
  model = models.build_model(config.model, vocab_sizes={},
                             num_classes={"answer": 5}, axis_name=None)
  schedule = optim.make_schedule(config.optim, 10)
  tx = optim.make_optimizer(config.optim, schedule)
  batch = next(small_film_batches())
  state = steps.create_train_state(model, tx, batch, jax.random.PRNGKey(0))
  step = jax.jit(functools.partial(
      steps.train_step, model=model, tx=tx, learning_rate_fn=schedule,
      objective=losses.Supervised(losses.head_targets(config.model.heads)),
      axis_name=None,
      skip_nonfinite_updates=skip))
  return state, step, batch


def test_skip_nonfinite_updates_keeps_the_state_and_counts():
  state, step, batch = _setup(skip=True)
  poisoned = dict(batch, image=np.full_like(batch["image"], np.nan))
  new_state, metrics = step(state, poisoned)
  assert not np.isfinite(metrics["loss"])
  assert set(metrics) >= {"grad_norm/encoders_image", "grad_norm/fusion",
                          "grad_norm/heads_answer"}
  assert int(new_state.skipped_updates) == 1 and int(new_state.step) == 1
  jax.tree.map(np.testing.assert_array_equal, new_state.params, state.params)
  jax.tree.map(np.testing.assert_array_equal, new_state.opt_state,
               state.opt_state)
  # The skipped update did not advance the schedule: the first applied one
  # has warmup's learning rate 0, the second a positive one.
  good_state, metrics = step(new_state, batch)
  assert float(metrics["learning_rate"]) == 0.0
  good_state, metrics = step(good_state, batch)
  assert np.isfinite(metrics["loss"]) and int(good_state.skipped_updates) == 1
  changed = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                         good_state.params, state.params)
  assert any(jax.tree.leaves(changed))  # A finite batch updates the weights.


def test_nonfinite_loss_stops_with_step_and_metric():
  with pytest.raises(train.NonFiniteError,
                     match=r"Non-finite loss=nan in the steps up to 12.*skip_nonfinite_updates"):
    train._check_finite({"loss": float("nan"), "grad_norm": 1.0}, 12)
  with pytest.raises(train.NonFiniteError,
                     match=r"grad_norm=nan.*Non-finite gradients in: fusion\."):
    train._check_finite({"loss": 1.0, "grad_norm": float("nan"),
                         "grad_norm/encoders_image": 1.0,
                         "grad_norm/fusion": float("nan")}, 5)
  with pytest.raises(train.NonFiniteError, match="grad_norm=inf"):
    train._check_finite({"loss": 1.0, "grad_norm": float("inf")}, 3)
  train._check_finite({"loss": 1.0, "grad_norm": 2.0}, 3)
