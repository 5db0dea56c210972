r"""Multi-task learning on ``mm_shapes/relational``: the answer, the number of
objects and the question type, from one FiLM model.

The fusion ablation's FiLM recipe (``experiments/mm_shapes.py:fusion=film,
dataset=relational``: same encoders, fusion, optimiser and data) with three
heads on the fused features, each an MLP like the answer's:

  answer          softmax_xent on ``answer`` (13 classes): the task, first,
                  so that ``accuracy`` is still the answer's
  num_objects     the number of objects (3-6): ``mse`` regression
                  (``count=regression``, default; reports ``mae``) or
                  ``softmax_xent`` over the counts 0-6 (``count=
                  classification``; 0-2 never occur)
  question_type   softmax_xent on ``question_type`` (5 types; the question
                  alone tells it)

Fixed weighting gives every head weight 1 (the uniform weighting that
Kendall et al. 2018 compare against): mmjax's choice, untuned. Run with:

  python -m mmjax.main --config=experiments/mm_shapes_multitask.py \
      --workdir=/tmp/mmjax/multitask

Variants, as ``--config=experiments/mm_shapes_multitask.py:<arg>,<arg>``:

  loss_weighting=uncertainty  weights learned as log-variances (Kendall, Gal
                              & Cipolla 2018, arXiv:1705.07115; the form in
                              mmjax/losses.py); the default is fixed
  count=classification        the number of objects as a class
  tasks=answer                single-task: the answer head alone (the
                              fusion ablation's FiLM run; any subset of
                              answer+num_objects+question_type, answer first)
  runlocal                    a few steps on small batches, for tests and CI
"""

import ml_collections

from mmjax import config_common
from mmjax.data import preprocess

TASKS = ("answer", "num_objects", "question_type")
COUNTS = ("regression", "classification")
# mm_shapes/relational draws 3-6 objects; as a class, the count is 0-6.
NUM_COUNT_CLASSES = 7


def _keeping(pp: str, keys: tuple[str, ...]) -> str:
  """Preprocessing ``pp`` with its ``keep`` op keeping ``keys`` too."""
  ops = []
  for name, kwargs in preprocess.parse_pp(pp):
    if name == "keep":
      kwargs = dict(kwargs, keys=tuple(kwargs["keys"]) + keys)
    ops.append(f"{name}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})")
  return "|".join(ops)


def _heads(tasks: tuple[str, ...], count: str) -> dict[str, dict]:
  """``config.model.heads`` of ``tasks``, each an MLP as the answer's."""
  heads = {}
  for task in tasks:
    head = dict(name="classifier", target=task, hidden=(256,), dropout=0.0)
    if task == "num_objects" and count == "regression":
      head["loss"] = "mse"
    elif task == "num_objects":
      head["num_classes"] = NUM_COUNT_CLASSES
    heads[task] = head
  return heads


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = config_common.parse_arg(arg, tasks=TASKS, count="regression",
                                loss_weighting="fixed", runlocal=False)
  if not arg.tasks or arg.tasks[0] != "answer" or not set(arg.tasks) <= set(
      TASKS):
    raise ValueError(f"tasks={'+'.join(arg.tasks)}: the answer first, then "
                     f"any of {', '.join(TASKS[1:])}.")
  if arg.count not in COUNTS:
    raise ValueError(f"count={arg.count!r}; valid: {', '.join(COUNTS)}.")
  config = config_common.sibling_experiment(
      __file__, "mm_shapes.py", "fusion=film,dataset=relational" +
      (",runlocal" if arg.runlocal else ""))
  extra = tuple(arg.tasks[1:])
  config.input.pp_train = _keeping(config.input.pp_train, extra)
  config.input.pp_eval = _keeping(config.input.pp_eval, extra)
  config.model.heads = _heads(arg.tasks, arg.count)
  config.model.loss_weighting = arg.loss_weighting
  return config
