"""Data: the built-in ``mm_shapes`` dataset and the input pipeline.

Nothing is imported here, so that importing a light module (a tokenizer, the
preprocessing ops) does not pull in TFDS.
"""
