"""Synthetic-data profiles name their reference config instead of copying it (configs are written once)."""

from __future__ import annotations

import dataclasses

import pytest

from cltdr_jax import synth
from cltdr_jax.config import bundled_configs, config_from_dict, load_config


@pytest.mark.parametrize("like", synth.PROFILES)
def test_profile_names_a_bundled_reference_config_and_few_overrides(like):
    spec = synth.load_profile(like)["config"]
    assert set(spec) == {"base", "overrides"}
    assert spec["base"] in {c.name for c in bundled_configs() if c.reference}
    allowed = {"output_folder", "devices", "test_cfg.ext_score_file"}
    assert {o.split("=")[0] for o in spec["overrides"]} <= allowed
    base = load_config(spec["base"])
    derived = config_from_dict(synth.profile_config(synth.load_profile(like)))
    # Only what a synthetic dataset has no use for differs from the reference config.
    assert dataclasses.replace(derived, output_folder=base.output_folder, devices=base.devices, source=None) == (
        dataclasses.replace(
            base,
            source=None,
            test_cfg=dataclasses.replace(base.test_cfg, ext_score_file=derived.test_cfg.ext_score_file),
        )
    )


def test_written_config_is_the_base_with_the_dataset_filled_in(tmp_path):
    path = synth.synthesize("thumos14", tmp_path, feature_dim=8, num_videos=6, seed=0, features=False)
    written = load_config(path)
    expected = load_config(
        "thumos_i3d_focalloss",
        [
            "output_folder=null",
            f"dataset.json_file={tmp_path / 'annotations.json'}",
            f"dataset.feat_folder={tmp_path / 'features'}",
            "dataset.input_dim=8",
            f"dataset.num_classes={written.dataset.num_classes}",
        ],
    )
    assert dataclasses.replace(written, source=None) == dataclasses.replace(expected, source=None)
    assert "bundled reference config thumos_i3d_focalloss" in path.read_text().splitlines()[1]
