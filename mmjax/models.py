"""Assembles a multimodal model from named parts in the config.

    encoders (one per fused modality) -> fusion block -> heads

``config.model.modalities`` chooses which modalities are fused, so a unimodal
baseline is ``modalities=("image",)`` with a fusion that accepts one input
(``concat``). Every hyper-parameter in ``config.model.encoders.<modality>``,
``config.model.fusion`` and ``config.model.heads.<head>`` is passed one to one
to the module of that name.

Token-only modalities: a fusion block declares the modalities whose
``tokens`` alone it reads (``Fusion.token_modalities``: FiLM's ``target``;
every modality of ``mult``, ``mm_transformer`` and ``mbt``), and
``build_model`` builds their encoders without a pooled projection
(``Encoder.without_pooled_projection``: the field named by the encoder's
``pooled_projection``, e.g. ``cnn``'s ``dim``, set to 0), whose parameters
the fusion would never train. So one image encoder config (``cnn`` with
``dim=128``) serves every fusion: a fusion of pooled vectors (``concat``)
gets its ``Dense(128)``, FiLM and the attention fusions the feature map
alone, exactly as if the config had said ``dim=0``. An encoder with no
``pooled_projection`` is built as configured.

Decision-level (late) fusion (fusion ``decision``; Snoek et al. 2005,
Ramachandram & Taylor 2017) is the one exception to "fusion -> heads": a
fusion that returns a dict ``{modality: [batch, dim]}`` instead of one array
gets every head applied to each modality's features, with separate parameters
per modality (``heads_<head>_<modality>``), and the head's logits are the mean
of the per-modality logits. Other fusions keep the parameter tree
``encoders_<modality>``, ``fusion``, ``heads_<head>``.

Modality dropout: ``config.model.modality_dropout = p`` (default 0) drops,
in training only, each modality of each example with probability ``p``, but
never all of an example's modalities (``sample_modality_keep``; a model of
one modality drops nothing). A dropped modality's input is zeroed and, where
it has one, its ``<modality>_mask`` set all False: for an image or a
spectrogram this is ``mmjax.robustness``'s ``zeros`` replacement; for token
ids (0 is the padding id) it is the empty sequence, so that the mask does
not tell the dropped text's length. The idea, dropping whole modalities in
training so that any subset of them predicts, is ModDrop's (Neverova et al.
2015, arXiv:1501.00102); the details are mmjax's choices, not the paper's:
the model's inputs are dropped, per example, with one probability for every
modality, never all of them, and nothing is rescaled. With
``p = 0`` nothing is drawn from the ``dropout`` rng: runs are bit for bit
those of a config without the setting.

Heads and their losses: each head of ``config.model.heads`` has a ``target``
(the batch key of its labels), a ``loss`` (``mmjax.losses.LOSSES``, default
"softmax_xent") and a ``weight``. A classification head gets ``num_classes``
from the dataset's feature ``target`` unless the config sets it; a regression
head (``mse``, ``l1``) gets one output, ``[batch, 1]``. With
``config.model.loss_weighting="uncertainty"`` the model also declares the
learned log-variances of the heads' losses (``losses.LogVariances``, params
``loss_weighting/<head>``); the model does not use them, the loss does.

Two-tower contrastive models (``config.model.contrastive``, see
``mmjax.contrastive``): ``TwoTowerModel`` encodes each of two modalities,
projects its pooled encoding linearly (no bias, as CLIP) to a joint
``embed_dim`` and returns ``{modality: embedding}``; it has no fusion and no
heads. Its parameter tree is ``encoders_<modality>`` (the same names as a
fusion model's, so that ``config.init_from_parts`` can warm-start a fusion
model's encoder from a tower), ``projection_<modality>`` and ``logit_scale``.

Mixed precision: ``config.model.dtype`` (default "float32") is the compute
dtype of every part with a ``dtype`` attribute, e.g. "bfloat16" on GPU/TPU.
Parameters (hence gradients and optimizer state), BatchNorm statistics and
the logits the model returns stay float32, so losses and metrics are
computed in float32.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from mmjax import contrastive
from mmjax import losses
from mmjax import registry
from mmjax.encoders.base import Encoding

# Keys of a part's config that configure the assembly, not the module.
PART_KEYS = ("name",)
# A head's labels, loss and loss weight.
HEAD_KEYS = ("name", "target", "weight", "loss")
# config.model.dtype values. float16 would need loss scaling (its range
# underflows small gradients); bfloat16 has float32's range and does not.
DTYPES = ("float32", "bfloat16")


class MultimodalModel(nn.Module):
  """Encoders -> fusion -> heads.

  Attributes:
    encoders: modality -> encoder module (unbound), in fusion order.
    fusion: the fusion block.
    heads: head name -> head module.
    modality_dropout: in training, the probability of dropping each modality
      of each example (see the module docstring).
    loss_weighting: ``losses.WEIGHTINGS``; "uncertainty" declares the heads'
      learned log-variances.
  """
  encoders: Mapping[str, nn.Module]
  fusion: nn.Module
  heads: Mapping[str, nn.Module]
  modality_dropout: float = 0.0
  loss_weighting: str = "fixed"

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], *,
               train: bool) -> dict[str, jax.Array]:
    """``batch[modality]`` (and optional ``batch[f"{modality}_mask"]``) ->
    ``{head: logits [batch, num_classes]}`` (a regression head: values
    ``[batch, 1]``); the mean over modalities of each modality's outputs when
    the fusion returns ``{modality: features}``."""
    if self.loss_weighting == "uncertainty":  # Created here, read by the loss.
      losses.LogVariances(tuple(self.heads), name=losses.LOG_VARIANCES)()
    check_batch_has(batch, self.encoders, "fuses")
    if train and self.modality_dropout > 0 and len(self.encoders) > 1:
      modalities = tuple(self.encoders)
      keep_BxM = sample_modality_keep(
          self.make_rng("dropout"), len(batch[modalities[0]]),
          len(modalities), self.modality_dropout)
      batch = drop_modalities(batch, keep_BxM, modalities)
    encodings: dict[str, Encoding] = {}
    for modality, encoder in self.encoders.items():
      encodings[modality] = encoder(batch[modality],
                                    batch.get(f"{modality}_mask"), train=train)
    fused = self.fusion(encodings, train=train)
    # Logits in float32 whatever the compute dtype: the loss is computed
    # from them.
    if not isinstance(fused, Mapping):
      return {name: head(fused, train=train).astype(jnp.float32)
              for name, head in self.heads.items()}
    # Decision-level fusion: one copy of each head per modality, logits averaged.
    return {name: jnp.mean(jnp.stack([
        head.copy(name=f"heads_{name}_{modality}")(x, train=train).astype(
            jnp.float32)
        for modality, x in fused.items()]), axis=0)
            for name, head in self.heads.items()}


class TwoTowerModel(nn.Module):
  """One encoder per modality and a linear projection to a joint space.

  Attributes:
    encoders: the two modalities' encoders (unbound), image side first.
    embed_dim: the joint embedding's width.
    loss: "clip" or "siglip": which learned scale (and bias) to declare
      (``contrastive.LogitScale``; the objective reads them).
    dtype: the projections' compute dtype.
  """
  encoders: Mapping[str, nn.Module]
  embed_dim: int
  loss: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, batch: Mapping[str, jax.Array], *,
               train: bool) -> dict[str, jax.Array]:
    """``batch[modality]`` (and optional ``<modality>_mask``) -> ``{modality:
    [batch, embed_dim]}`` float32 embeddings, not normalised."""
    contrastive.LogitScale(self.loss, name=contrastive.LOGIT_SCALE)()
    check_batch_has(batch, self.encoders, "embeds")
    embeddings = {}
    for modality, encoder in self.encoders.items():
      encoding = encoder(batch[modality], batch.get(f"{modality}_mask"),
                         train=train)
      embeddings[modality] = nn.Dense(
          self.embed_dim, use_bias=False, dtype=self.dtype,
          name=f"projection_{modality}")(encoding.pooled).astype(jnp.float32)
    return embeddings


def check_batch_has(batch: Mapping[str, jax.Array],
                    modalities: Mapping[str, Any], verb: str) -> None:
  """Raises naming the first of the model's ``modalities`` that ``batch``
  lacks ("The model <verb> modality ..."), and what the batch holds."""
  for modality in modalities:
    if modality not in batch:
      raise ValueError(f"The model {verb} modality {modality!r} but the "
                       f"batch has only: {', '.join(sorted(batch))}.")


def sample_modality_keep(rng: jax.Array, batch_size: int,
                         num_modalities: int, p: float) -> jax.Array:
  """``[batch, modalities]`` bool, True where an example keeps a modality.

  Each entry is dropped with probability ``p``, independently; an example
  that would drop them all keeps one, drawn uniformly. So a modality is
  dropped with probability ``p - p**M / M`` for ``M`` modalities (a little
  under ``p``), and no example is left without input.
  """
  drop_rng, rescue_rng = jax.random.split(rng)
  keep_BxM = jax.random.uniform(drop_rng, (batch_size, num_modalities)) >= p
  rescue_B = jax.random.randint(rescue_rng, (batch_size,), 0, num_modalities)
  none_kept_B = ~keep_BxM.any(axis=1)
  return keep_BxM | (none_kept_B[:, None] &
                     (jnp.arange(num_modalities) == rescue_B[:, None]))


def drop_modalities(batch: Mapping[str, jax.Array], keep_BxM: jax.Array,
                    modalities: tuple[str, ...]) -> dict[str, jax.Array]:
  """``batch`` with modality ``modalities[m]`` of example ``b`` zeroed (its
  ``<modality>_mask`` too, if any) where ``keep_BxM[b, m]`` is False."""
  batch = dict(batch)
  for m, modality in enumerate(modalities):
    for key in (modality, f"{modality}_mask"):
      if key in batch:
        x = batch[key]
        keep = keep_BxM[:, m].reshape((-1,) + (1,) * (x.ndim - 1))
        batch[key] = jnp.where(keep, x, jnp.zeros_like(x))
  return batch


def build_model(model_config: ml_collections.ConfigDict, *,
                vocab_sizes: Mapping[str, int],
                num_classes: Mapping[str, int],
                axis_name: str | None) -> MultimodalModel | TwoTowerModel:
  """Instantiates the configured parts: a ``TwoTowerModel`` when the config
  has ``contrastive``, else a ``MultimodalModel``, whose encoders of the
  fusion's token-only modalities have no pooled projection (see the module
  docstring).

  Args:
    model_config: ``config.model``; its ``dtype`` (one of ``DTYPES``, default
      "float32") is given to every part with a ``dtype`` attribute, its
      ``modality_dropout`` (default 0) to the model.
    vocab_sizes: text modality -> vocabulary size (from the data), given to
      encoders that have a ``vocab_size`` attribute left unset.
    num_classes: target field -> number of classes (from the dataset), given to
      classification heads whose ``num_classes`` is unset; a regression head
      gets 1.
    axis_name: the data-parallel axis, given to every part with an
      ``axis_name`` attribute (synchronised BatchNorm statistics).
  """
  registry.register_all()
  model_wide = {"axis_name": axis_name,
                "dtype": jnp.dtype(model_config.get("dtype", "float32"))}
  fusion, token_only = None, frozenset()
  if not model_config.get("contrastive"):
    fusion = _instantiate(registry.FUSIONS, model_config.fusion, PART_KEYS,
                          model_wide)
    token_only = fusion.token_modalities(model_config.modalities)
  encoders = {}
  for modality in model_config.modalities:
    part = model_config.encoders[modality]
    encoders[modality] = _instantiate(
        registry.ENCODERS, part, PART_KEYS, model_wide,
        vocab_size=vocab_sizes.get(modality))
    if modality in token_only:
      encoders[modality] = encoders[modality].without_pooled_projection()
  if fusion is None:
    return TwoTowerModel(encoders=encoders,
                         embed_dim=model_config.contrastive.embed_dim,
                         loss=model_config.contrastive.loss,
                         dtype=model_wide["dtype"])
  heads = {}
  for head_name, part in model_config.heads.items():
    heads[head_name] = _instantiate(
        registry.HEADS, part, HEAD_KEYS, model_wide,
        num_classes=_head_outputs(head_name, part, num_classes))
  return MultimodalModel(
      encoders=encoders, fusion=fusion, heads=heads,
      modality_dropout=float(model_config.get("modality_dropout", 0.0)),
      loss_weighting=model_config.get("loss_weighting", "fixed"))


def _head_outputs(head_name: str, part: ml_collections.ConfigDict,
                  num_classes: Mapping[str, int]) -> int:
  """A head's number of outputs: 1 for a regression loss, else its
  ``num_classes`` (the config's, else the dataset's)."""
  if losses.LOSSES[part.get("loss", losses.DEFAULT_LOSS)].regression:
    return 1
  outputs = part.get("num_classes") or num_classes.get(part.target)
  if outputs is None:
    raise ValueError(
        f"config.model.heads.{head_name}: the dataset gives no number of "
        f"classes for target {part.target!r} (not a class label); set "
        f"config.model.heads.{head_name}.num_classes.")
  return outputs


def _instantiate(reg: registry.Registry, part: ml_collections.ConfigDict,
                 assembly_keys: tuple[str, ...], model_wide: Mapping[str, Any],
                 **from_data: Any) -> nn.Module:
  """``reg[part.name](**part)``, filling unset data-dependent fields and
  setting the ``model_wide`` ones (``axis_name``, ``dtype``) wherever the part
  has them."""
  cls = reg.get(part.name)
  fields = {f.name for f in dataclasses.fields(cls)}
  kwargs = {k: _freeze(v) for k, v in part.items() if k not in assembly_keys}
  for key, value in from_data.items():
    if key in fields and kwargs.get(key) is None and value is not None:
      kwargs[key] = value
  for key, value in model_wide.items():
    if key in fields:
      kwargs[key] = value
  return cls(**kwargs)


def _freeze(value: Any) -> Any:
  """Lists from JSON/ConfigDict -> tuples, so module attributes hash."""
  if isinstance(value, list):
    return tuple(_freeze(v) for v in value)
  return value


def count_params(params: Any) -> int:
  return sum(x.size for x in jax.tree.leaves(params))
