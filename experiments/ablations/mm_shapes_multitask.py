r"""Single-task vs multi-task on ``mm_shapes/relational``: does learning the
number of objects and the question type alongside help the answer?

Three methods, seeds 0, 1 and 2 each (initialisation and data order), with
the fusion ablation's budget and FiLM recipe (``experiments/
mm_shapes_multitask.py``):

  single_task             the answer head alone (the fusion ablation's
                          ``film`` runs, config for config)
  multitask_fixed         answer + number of objects (mse) + question type,
                          every weight 1
  multitask_uncertainty   the same heads, weights learned (Kendall et al.
                          2018, arXiv:1705.07115; mmjax/losses.py)

The table's accuracy is the answer's (the first head); the multi-task rows
add each head's metric. Run, resume and tabulate with:

  python -m mmjax.sweep --sweep=experiments/ablations/mm_shapes_multitask.py \
      --workdir=/tmp/mmjax/ablations/mm_shapes_multitask
"""

CONFIG = "experiments/mm_shapes_multitask.py"

# As experiments/ablations/mm_shapes_fusion.py: 2,000 steps at batch 128
# (4.3 epochs), evaluated once, at the end.
OVERRIDES = {"train.steps": 2000, "train.eval_every_steps": 2000,
             "checkpoint.every_steps": 1000}

SEEDS = (0, 1, 2)

METHODS = (("single_task", "tasks=answer"),
           ("multitask_fixed", "loss_weighting=fixed"),
           ("multitask_uncertainty", "loss_weighting=uncertainty"))


def get_sweep() -> list[dict]:
  return [dict(name=f"{method}_seed{seed}", group=method, arg=arg,
               overrides=dict(OVERRIDES, seed=seed))
          for method, arg in METHODS for seed in SEEDS]
