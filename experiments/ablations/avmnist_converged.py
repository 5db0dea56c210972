r"""The AV-MNIST fusion comparison at convergence (issue 14).

``avmnist_fusion.py``'s nine networks (every method and the two unimodal
baselines; 3 seeds each, as one program) and the SVM, trained for ``EPOCHS``
instead of 1, with the validation split evaluated after every epoch so that
``results.json``'s ``best`` is the test accuracy at the best validation
epoch, as MultiBench reports it. The recipe is ``experiments/avmnist.py``'s
(MultiBench's late-fusion SGD for every method but MulT). The robustness
runs (``*_moddrop``) stay at 1 epoch.

A second table: the methods whose MultiBench example script has a recipe of
its own (``MULTIBENCH_RECIPES``) train again with it, its epochs scaled by
``EPOCHS / 30`` as late fusion's are (groups ``<method>_multibench``). Late
fusion's recipe is the first table's, so its row serves both.

The budget: over 30 epochs, late fusion (seed 0, dataset version 1.1.0)
reaches its validation plateau at about epoch 9, and its mean validation
accuracy gains 0.2 points per 7 epochs after that (docs/avmnist.md,
"The budget"); 20 epochs is past the plateau's start at two thirds of
MultiBench's 30 epochs' cost. On the 2-core CPU machine with two CPU
devices, an epoch takes ~75 s a seed (late fusion; audio only, 3 seeds as
one program, the same), so the 11 networks x 3 seeds took 17.4 hours of
training (docs/avmnist.md: 15.4 h on the AMD EPYC for all but
``multiplicative_multibench``, 2.0 h on a slower 2-core Intel Xeon): run the
table over several sittings (the sweep resumes; MulT, the slowest, comes
last) and keep the workdir outside the repository::

  python -m mmjax.sweep --sweep=experiments/ablations/avmnist_converged.py \
      --workdir=/tmp/mmjax/ablations/avmnist_converged \
      --override=parallel.cpu_devices=2

docs/avmnist.md's table ran with XLA's CPU pool at 4 threads, the default
for two CPU devices before commit 766d56d (now one thread per device), and
before commit aa5cdf8 (planar blocks' gradients materialised); both group
a two-device run's float sums differently. To rerun it bit for bit, check
out commit 225cd0e and prefix the command with ``PJRT_NPROC=4``.
"""

import os

from mmjax import config_common

avmnist_fusion = config_common.sibling_file(__file__, "avmnist_fusion.py")
avmnist = config_common.sibling_file(__file__,
                                     os.path.join(os.pardir, "avmnist.py"))

CONFIG = avmnist_fusion.CONFIG
EPOCHS = 20
# Steps in an epoch: every variant trains at the experiment's batch size.
EPOCH_STEPS = avmnist.TRAIN_EXAMPLES // avmnist.get_config().input.batch_size


# MultiBench's AV-MNIST recipes other than late fusion's, as its example
# scripts train them (examples/multimedia/avmnist_low_rank_tensor.py and
# avmnist_multi_interac_matrix.py): SGD's learning rate and weight decay, and
# the epochs. mmjax's fusion layers keep experiments/avmnist.py's sizes.
MULTIBENCH_RECIPES = {
    "low_rank": dict(learning_rate=0.05, weight_decay=2e-4, epochs=30),
    "multiplicative": dict(learning_rate=0.05, weight_decay=1e-4, epochs=20),
}
MULTIBENCH_EPOCHS = 30  # Late fusion's, which EPOCHS scales.


def get_sweep() -> list[dict]:
  every_epoch = {"train.eval_every_steps": EPOCH_STEPS}
  table = avmnist_fusion.variants(EPOCHS, overrides=every_epoch,
                                  moddrop=False)
  table += [multibench_variant(name, **recipe, overrides=every_epoch)
            for name, recipe in MULTIBENCH_RECIPES.items()]
  # MulT, the slowest by far, last: the rest of the table fills in first.
  return sorted(table, key=lambda variant: variant["name"] == "mult")


def multibench_variant(name: str, learning_rate: float, weight_decay: float,
                       epochs: int, overrides: dict) -> dict:
  """``name``'s network with MultiBench's recipe for it, its ``epochs``
  scaled to this sweep's budget."""
  scaled_epochs = round(epochs * EPOCHS / MULTIBENCH_EPOCHS)
  recipe = {"optim.learning_rate": learning_rate,
            "optim.weight_decay": weight_decay}
  return dict(avmnist_fusion.network(name, scaled_epochs,
                                     {**overrides, **recipe}),
              name=f"{name}_multibench")
