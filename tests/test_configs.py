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
    assert load_config(path, ["trainer.remat=[gmg, heads, fusion]"]).trainer.remat == ("gmg", "heads", "fusion")
    with pytest.raises(ConfigError, match=r"trainer.remat: unknown part 'neck' \(gmg, heads, fusion\)"):
        load_config(path, ["trainer.remat=[gmg, neck]"])


# ---------------------------------------------------------------------------------------------------
# The bundled configs: a name works wherever a CONFIG is taken; `cltdr configs` lists them.


def test_bundled_configs_are_the_reference_eleven_and_one_explained_extra():
    from cltdr_jax.config import bundled_config_dir, bundled_configs

    assert bundled_config_dir() == CONFIGS  # a checkout or editable install reads configs/ itself
    listed = {c.name: c for c in bundled_configs()}
    assert sorted(n for n, c in listed.items() if c.reference) == sorted(REFERENCE)
    extras = [c for c in listed.values() if not c.reference]
    assert [c.name for c in extras] == ["thumos_i3d"]
    assert "not one of the authors' 11 configs" in extras[0].description
    assert "exists because" in extras[0].path.read_text().split("\ndataset_name")[0]
    th = listed["thumos_i3d_focalloss"]
    assert (th.result, th.average_map, th.tiou) == ("THUMOS14 I3D", 69.9, "0.3:0.1:0.7")
    assert th.description.startswith("THUMOS14 (20 classes), I3D")
    for c in listed.values():
        if c.reference:
            assert c.result and c.average_map and c.tiou, c.name


def test_a_bundled_name_loads_like_the_file(tmp_path, monkeypatch):
    from cltdr_jax.config import resolve_config

    by_path = load_config(CONFIGS / "thumos_i3d_focalloss.yaml", ["model.embd_dim=256", "model.fpn_dim=256"])
    monkeypatch.chdir(tmp_path)  # outside the checkout, as after `pip install`
    by_name = load_config("thumos_i3d_focalloss", ["model.embd_dim=256", "model.fpn_dim=256"])
    assert by_name == by_path
    # The README's spelling works too where no such file is here; a file that exists always wins.
    assert resolve_config("configs/thumos_i3d_focalloss.yaml") == CONFIGS / "thumos_i3d_focalloss.yaml"
    mine = tmp_path / "thumos_i3d_focalloss.yaml"
    mine.write_text(BASE)
    assert resolve_config("thumos_i3d_focalloss.yaml") == mine.relative_to(tmp_path)
    with pytest.raises(ConfigError, match="nor a bundled config.*thumos_videomae.*cltdr configs"):
        load_config("thumos_i3d_focaloss")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "sub" / "thumos_i3d_focalloss.yaml")  # an explicit path is never replaced


def test_configs_command_lists_dataset_features_and_paper_result(capsys):
    from cltdr_jax.cli import main

    assert main(["configs"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line for line in out.splitlines() if line and line.split()[0] in REFERENCE}
    assert sorted(rows) == sorted(REFERENCE)
    assert "69.9" in rows["thumos_i3d_focalloss"] and "0.3:0.1:0.7" in rows["thumos_i3d_focalloss"]
    assert "I3D RGB + flow features" in rows["thumos_i3d_focalloss"]
    assert "37.1" in rows["anet_tsp"] and "TSP" in rows["anet_tsp"]
    assert "not one of the reference's configs" in out and "thumos_i3d " in out


def test_loader_num_workers_drives_the_data_workers(tmp_path):
    path = _write(tmp_path, BASE)
    assert load_config(path).data_workers == 0  # ours: the main process (the reference's default is 4)
    assert load_config(path, ["loader.num_workers=3"]).data_workers == 3
    # trainer.grain_workers, the old name, still loads and, where given, wins (configs written before).
    old = load_config(path, ["loader.num_workers=4", "trainer.grain_workers=0"])
    assert old.data_workers == 0
