"""The training forward (our model -> targets -> losses) on the reference's own training batches."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from cltdr_jax.assignment import assign_targets_batch
from cltdr_jax.config import load_config
from cltdr_jax.convert import convert_checkpoint
from cltdr_jax.losses import detection_losses
from cltdr_jax.model.detector import CLTDRGMG
from cltdr_jax.points import make_points


@pytest.mark.parametrize("batch", [0, 1])
def test_training_losses_match_reference(thumos_small, batch):
    cfg = load_config(thumos_small / "config.yaml")
    params = convert_checkpoint(cfg, thumos_small / "state_dict.npz")
    ref = np.load(thumos_small / "reference_outputs.npz")
    prefix = f"train/batch{batch}"
    videos = [str(v) for v in ref[f"{prefix}/video_ids"]]
    length = cfg.dataset.max_seq_len
    feats = np.zeros((len(videos), length, cfg.dataset.input_dim), np.float32)
    mask = np.zeros((len(videos), length), bool)
    slots = max(len(ref[f"{prefix}/v{i}/labels"]) for i in range(len(videos)))
    segments = np.zeros((len(videos), slots, 2), np.float32)
    labels = np.zeros((len(videos), slots), np.int32)
    valid = np.zeros((len(videos), slots), bool)
    for i, vid in enumerate(videos):
        start, end = ref[f"{prefix}/v{i}/feat_window"]
        window = np.load(thumos_small / "features" / f"{vid}.npy")[start:end]
        feats[i, : len(window)] = window
        mask[i, : len(window)] = True
        n = len(ref[f"{prefix}/v{i}/labels"])
        segments[i, :n] = ref[f"{prefix}/v{i}/segments"]
        labels[i, :n] = ref[f"{prefix}/v{i}/labels"]
        valid[i, :n] = True

    model = CLTDRGMG(cfg.model, cfg.train_cfg)
    points = np.concatenate(make_points(length, cfg.strides, cfg.model.regression_range))

    @jax.jit
    def losses(params):
        # The fixture's training forward ran with input noise and drop-path probability 0.
        outputs = model.apply({"params": params}, feats, mask, deterministic=True)
        cls_t, reg_t = assign_targets_batch(
            points, segments, labels, valid, cfg.dataset.num_classes, cfg.train_cfg.center_sample_radius
        )
        return detection_losses(
            outputs, cls_t, reg_t, outputs["masks"], cfg.train_cfg.init_loss_norm, cfg.train_cfg, cfg.model
        )

    out, loss_norm = jax.device_get(losses(params))
    for key in ("cls_loss", "reg_loss", "final_loss"):
        np.testing.assert_allclose(out[key], ref[f"{prefix}/{key}"], rtol=1e-5, err_msg=key)
    np.testing.assert_allclose(loss_norm, ref[f"{prefix}/loss_normalizer_after_coarse"], rtol=1e-6)
