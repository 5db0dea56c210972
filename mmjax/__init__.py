"""mmjax: multimodal deep learning in JAX.

``mmjax.load(workdir, checkpoint="best")`` returns a finished run's config
and a ``predict`` function (see ``mmjax.evaluate``).
"""


def __getattr__(name: str):
  # Imported on first use: ``import mmjax.x`` stays as light as module x.
  if name == "load":
    from mmjax.evaluate import load  # pylint: disable=g-import-not-at-top
    return load
  raise AttributeError(f"module 'mmjax' has no attribute {name!r}")
