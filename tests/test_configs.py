"""The shipped configs: they load, and build the reference's models (REFERENCE.md 2.3).

Parameter shapes come from `abstract_params` (jax.eval_shape, no computation), so even the HACS models
(85M parameters) cost nothing to check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from flax import traverse_util

from cltdr_jax.config import ConfigError, load_config
from cltdr_jax.convert import abstract_params, torch_name

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

# name: (parameters, state_dict entries, levels, max_div_factor), from REFERENCE.md 2.3.
REFERENCE = {
    "anet_tsp": (15_011_628, 212, 6, 480),
    "epic_slowfast_noun_focalloss": (27_877_686, 212, 6, 160),
    "epic_slowfast_verb_vflloss": (23_337_332, 212, 6, 160),
    "hacs_i3d_focalloss": (84_395_224, 234, 7, 960),
    "hacs_slowfast_focalloss": (85_128_412, 234, 7, 192),
    "multithumos_i3d": (24_344_500, 212, 6, 32),
    "multithumos_i3d_rgb_only_focalloss": (20_934_836, 212, 6, 32),
    "multithumos_videomae_vflloss": (23_361_460, 212, 6, 32),
    "thumos_i3d_focalloss": (21_908_390, 212, 6, 32),
    "thumos_intervideo_vflloss": (23_677_862, 212, 6, 32),
    "thumos_videomae": (20_925_350, 212, 6, 32),
}


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.sgp_mlp_dim is not None
    assert len(cfg.model.regression_range) == cfg.num_levels


def test_all_reference_configs_present():
    missing = [name for name in REFERENCE if not (CONFIGS / f"{name}.yaml").is_file()]
    assert not missing


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_model_size(name):
    n_params, n_entries, levels, max_div = REFERENCE[name]
    cfg = load_config(CONFIGS / f"{name}.yaml")
    assert cfg.num_levels == levels
    assert cfg.max_div_factor == max_div
    assert cfg.strides == tuple(2**l for l in range(levels))
    flat = traverse_util.flatten_dict(abstract_params(cfg))
    assert sum(int(np.prod(x.shape)) for x in flat.values()) == n_params
    names = {torch_name(path)[0] for path in flat}
    assert len(flat) == n_entries
    assert len(names) == n_entries  # one torch name per parameter tensor


def test_derived_dataset_fields():
    cfg = load_config(CONFIGS / "thumos_videomae.yaml")  # also sets model.num_classes in the YAML
    assert cfg.model.input_dim == cfg.dataset.input_dim == 1408
    assert cfg.model.num_classes == cfg.dataset.num_classes == 20
    assert cfg.model.max_seq_len == cfg.dataset.max_seq_len == 2304
    anet = load_config(CONFIGS / "anet_tsp.yaml")
    assert anet.test_cfg.multiclass_nms is False
    assert anet.test_cfg.ext_score_file.endswith(".json")
    assert anet.model.max_buffer_len_factor == 1.0 and not anet.model.extend_point_buffer
    # MultiTHUMOS: rgb_only stays unset (REFERENCE.md 12.10); the loader decides from input_dim.
    for name in ("multithumos_i3d", "multithumos_i3d_rgb_only_focalloss", "multithumos_videomae_vflloss"):
        assert load_config(CONFIGS / f"{name}.yaml").dataset.rgb_only is None


def _write(tmp_path, text, name="bad.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


BASE = "dataset_name: thumos\nmodel:\n  sgp_mlp_dim: 768\n"


def test_unknown_key_names_key_and_file(tmp_path):
    path = _write(tmp_path, BASE + "  embd_dimm: 256\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "embd_dimm" in str(e.value) and str(path) in str(e.value)

    path = _write(tmp_path, BASE + "not_a_section: 1\n", "top.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "not_a_section" in str(e.value) and str(path) in str(e.value)


def test_wrong_type_names_key_and_file(tmp_path):
    path = _write(tmp_path, BASE + "  embd_dim: wide\n")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "model.embd_dim" in str(e.value) and str(path) in str(e.value)

    path = _write(tmp_path, BASE + "test_cfg:\n  multiclass_nms: 1\n", "bool.yaml")
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert "test_cfg.multiclass_nms" in str(e.value) and str(path) in str(e.value)


def test_overrides():
    path = CONFIGS / "thumos_i3d_focalloss.yaml"
    cfg = load_config(path, ["model.embd_dim=256", "model.fpn_dim=256", "test_cfg.multiclass_nms=false"])
    assert cfg.model.embd_dim == 256 and cfg.model.fpn_dim == 256
    assert cfg.test_cfg.multiclass_nms is False
    assert cfg.model.sgp_mlp_dim == 768  # untouched keys keep the file's values
    cfg = load_config(CONFIGS / "anet_tsp.yaml", ["model.extend_point_buffer=true"])
    assert cfg.model.extend_point_buffer is True
    with pytest.raises(ConfigError, match="model.embd_dim"):
        load_config(path, ["model.embd_dim=wide"])
    with pytest.raises(ConfigError, match="embd_dimm"):
        load_config(path, ["model.embd_dimm=256"])
