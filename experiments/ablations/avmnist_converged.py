r"""The AV-MNIST fusion comparison at convergence (issue 14).

``avmnist_fusion.py``'s variants (every method, the unimodal baselines, the
``*_moddrop`` runs and the SVM; 3 seeds each), trained for ``EPOCHS``
instead of 1, with the validation split evaluated after every epoch so that
``results.json``'s ``best`` is the test accuracy at the best validation
epoch, as MultiBench reports it. The recipes are ``experiments/avmnist.py``'s
(MultiBench's late-fusion SGD for every method but MulT).

The budget: over 30 epochs, late fusion (seed 0, dataset version 1.1.0)
reaches its validation plateau at about epoch 9, and its mean validation
accuracy gains 0.2 points per 7 epochs after that (docs/avmnist.md,
"Version 1.1.0"); 20 epochs is past the plateau's start at two thirds of
MultiBench's 30 epochs' cost. On the 2-core CPU machine with two CPU
devices, a late-fusion epoch takes ~75 s a seed, so the networks take
about a day of the machine (MulT far more than the others): run the table
over several sittings (the sweep resumes) and keep the workdir outside the
repository::

  python -m mmjax.sweep --sweep=experiments/ablations/avmnist_converged.py \
      --workdir=/tmp/mmjax/ablations/avmnist_converged \
      --override=parallel.cpu_devices=2
"""

import os

from mmjax import config_common

avmnist_fusion = config_common.sibling_file(__file__, "avmnist_fusion.py")
avmnist = config_common.import_file(
    os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir,
                 "avmnist.py"), "mmjax_file_avmnist")

CONFIG = avmnist_fusion.CONFIG
EPOCHS = 20
# Steps in an epoch: every variant trains at the experiment's batch size.
EPOCH_STEPS = avmnist.TRAIN_EXAMPLES // avmnist.get_config().input.batch_size


def get_sweep() -> list[dict]:
  return avmnist_fusion.variants(
      EPOCHS, overrides={"train.eval_every_steps": EPOCH_STEPS})
