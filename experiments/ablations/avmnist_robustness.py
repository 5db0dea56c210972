r"""AV-MNIST robustness: ``avmnist_fusion.py``'s robustness variants, seed 0.

Late fusion, a product fusion (tensor), the gate and an attention fusion
(MulT), each trained without and with modality dropout (``*_moddrop``), one
seed each (``avmnist_fusion.SEEDS[0]``), so the table fits a 2-core CPU
sitting: ~1 core-hour at 1 epoch for the 8 trainings plus their evaluations.
The variants, recipes and budget are ``avmnist_fusion.py``'s; only the seed
count differs, and its 3-seed runs evaluate the same way. Train, evaluate
with one modality missing or noised, and tabulate with:

  python -m mmjax.sweep --sweep=experiments/ablations/avmnist_robustness.py \
      --workdir=/tmp/mmjax/ablations/avmnist_robustness \
      --robustness --robustness_reference=late_fusion
"""

from mmjax import config_common

avmnist_fusion = config_common.sibling_file(__file__, "avmnist_fusion.py")

CONFIG = avmnist_fusion.CONFIG
NAMES = avmnist_fusion.MODDROP + tuple(
    f"{name}_moddrop" for name in avmnist_fusion.MODDROP)


def get_sweep() -> list[dict]:
  variants = {v["name"]: v for v in avmnist_fusion.get_sweep()}
  return [dict(variants[name],
               overrides={**variants[name]["overrides"], "train.num_seeds": 1})
          for name in NAMES]
