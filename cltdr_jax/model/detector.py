"""CLTDR-GMG: the GMG encoder and the CLTDR decoder as one Flax module.

    model = CLTDRGMG(cfg.model, cfg.train_cfg, dtype=jnp.bfloat16, precision="default")  # defaults: f32, highest
    variables = model.init(rng, feats, mask)           # feats [B, T_pad, D_in], mask [B, T_pad]
    outputs = model.apply(variables, feats, mask)       # dict of per-level lists, channels-last

Outputs (lists over levels l = 0 ... L-1, T_l = T_pad / 2**l):
  cls_logits          [B, T_l, C]   refined logits Z = coarse * refine_prob (a product of LOGITS, 12.4)
  coarse_cls_logits   [B, T_l, C]   cls_head logits A
  refine_prob_logits  [B, T_l, C]   RefineHead class logits R^p
  start_logits, end_logits [B, T_l, C]  Trident boundary logits (heads read the detached neck features)
  reg_offsets         [B, T_l, 2 (nb + 1)]  Trident centre-offset logits, start side first
  refine_start, refine_end [B, T_l, C]  RefineHead boundary shifts, in input-grid units
  masks               [B, T_l] bool
and, for parity tests, the feature maps backbone_feats, fpn_feats, cls_feats, reg_feats, cross_feats.

`dtype` is the compute dtype of every layer (parameters stay float32; norms, the FFT branch and the head
outputs above are float32 whatever it is), `precision` the matmul / convolution precision (`highest`, the
default, reproduces the reference exactly; see `layers.py`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from cltdr_jax.config import ModelConfig, TrainConfig
from cltdr_jax.model.decoder import ClassifierHead, CrossLevelFusion, DecoupledFusion, RefineHead
from cltdr_jax.model.encoder import Encoder
from cltdr_jax.model.layers import Dtype, Precision, one_after_another, rematerialized
from cltdr_jax.model.trident import TridentHead

Array = jax.Array


class CLTDRGMG(nn.Module):
    cfg: ModelConfig
    train_cfg: TrainConfig = TrainConfig()
    dtype: Dtype = jnp.float32
    precision: Precision = "highest"
    # Parts whose activations the backward pass recomputes instead of keeping (`trainer.remat`): "gmg" (each
    # GMG block), "heads" (the classification, Trident and refine heads), "fusion" (the two decoupled fusions
    # and the cross-level fusion that feed the heads); `remat_policy` what they keep.
    remat: tuple[str, ...] = ()
    remat_policy: str = "nothing"

    @nn.compact
    def __call__(self, feats: Array, mask: Array, deterministic: bool = True) -> dict[str, list[Array]]:
        m, t = self.cfg, self.train_cfg
        c = {"dtype": self.dtype, "precision": self.precision}
        num_levels = m.backbone_arch[2] + 1
        trunk_layers = m.head_num_layers - 1
        feats = feats.astype(self.dtype)
        fpn, backbone, masks = Encoder(
            m, t.droppath, **c, remat="gmg" in self.remat, remat_policy=self.remat_policy, name="backbone"
        )(feats, mask, deterministic)
        heads = "heads" in self.remat

        def head(module: type[nn.Module]) -> type[nn.Module]:
            return rematerialized(module, heads, self.remat_policy)

        fusion = "fusion" in self.remat
        decoupled = rematerialized(DecoupledFusion, fusion, self.remat_policy)
        cls_feats = decoupled(m.cls_fusion_levels, m.fusion, **c, name="decls")(fpn)
        reg_feats = decoupled(m.reg_fusion_levels, m.fusion, **c, name="dereg")(fpn)
        cross_feats = rematerialized(CrossLevelFusion, fusion, self.remat_policy)(**c, name="cross_level")(fpn)

        coarse = head(ClassifierHead)(
            m.head_dim,
            m.num_classes,
            m.head_kernel_size,
            trunk_layers,
            m.head_with_ln,
            t.cls_prior_prob,
            tuple(t.head_empty_cls),
            **c,
            name="cls_head",
        )(cls_feats, masks)
        # The losses send every head's output cotangent at once, so recomputed heads would all be alive
        # together. Chained, a head's output cotangent waits for the cotangent of the next head's input: the
        # backward pass recomputes the refine head, the Trident's three heads (one after another, in
        # TridentHead), then the classification head (XLA's temporaries of the THUMOS step with
        # [gmg, heads]: 0.78 -> 0.50 GB).
        coarse, reg_feats = one_after_another(heads, coarse, reg_feats)
        start, end, offsets = TridentHead(
            m.head_dim,
            m.num_classes,
            m.num_bins,
            m.head_kernel_size,
            m.boudary_kernel_size,
            trunk_layers,
            m.head_with_ln,
            t.cls_prior_prob,
            tuple(t.head_empty_cls),
            **c,
            remat=heads,
            remat_policy=self.remat_policy,
            name="trident",
        )(fpn, reg_feats, masks)
        (start, end, offsets), cross_feats = one_after_another(heads, (start, end, offsets), cross_feats)
        refine_start, refine_end, refine_prob = head(RefineHead)(
            m.head_dim,
            m.num_classes,
            m.head_kernel_size,
            trunk_layers,
            m.head_with_ln,
            num_levels,
            **c,
            name="refine_head",
        )(cross_feats, masks)
        # The losses and the decoder work in float32 whatever the compute dtype.
        coarse, start, end, offsets, refine_start, refine_end, refine_prob = (
            [x.astype(jnp.float32) for x in xs]
            for xs in (coarse, start, end, offsets, refine_start, refine_end, refine_prob)
        )

        if m.refine_cls:
            cls_logits = [a * r for a, r in zip(coarse, refine_prob, strict=True)]
        else:
            cls_logits = list(coarse)
        if not m.refine_reg:
            refine_start = [jnp.zeros_like(s) for s in refine_start]
            refine_end = [jnp.zeros_like(e) for e in refine_end]

        return {
            "cls_logits": cls_logits,
            "coarse_cls_logits": coarse,
            "refine_prob_logits": refine_prob,
            "start_logits": start,
            "end_logits": end,
            "reg_offsets": offsets,
            "refine_start": refine_start,
            "refine_end": refine_end,
            "masks": masks,
            "backbone_feats": backbone,
            "fpn_feats": fpn,
            "cls_feats": cls_feats,
            "reg_feats": reg_feats,
            "cross_feats": cross_feats,
        }
