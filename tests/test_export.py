"""Exports: the authors' PyTorch format (the exact inverse of conversion, checked bit for bit against the
fixture and on every shipped config) and the serialized XLA programs (the same detections as the
in-process model, in a fresh process that never runs the Flax model; refused when they do not fit)."""

from __future__ import annotations

import contextlib
import hashlib
import json
import pickletools
import shutil
import struct
import subprocess
import sys
import zipfile
from collections import OrderedDict
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import traverse_util
from test_configs import REFERENCE

from cltdr_jax.cli import main
from cltdr_jax.config import load_config
from cltdr_jax.convert import (
    CHANNEL,
    COMPLEX,
    CONV,
    CONV_TRANSPOSE,
    DEPTHWISE,
    DEPTHWISE_1,
    POINTWISE,
    SAME,
    abstract_params,
    convert_checkpoint,
    params_from_state_dict,
    state_dict_from_params,
    torch_name,
)
from cltdr_jax.errors import CheckpointError, DataError
from cltdr_jax.export.programs import ExportedPredictor, read_manifest
from cltdr_jax.torch_files import _read_torch_zip, write_torch_checkpoint

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def cfg(thumos_small):
    return load_config(thumos_small / "config.yaml")


@pytest.fixture(scope="module")
def converted(thumos_small, tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpt") / "thumos_small"
    assert main(["convert", str(thumos_small / "config.yaml"), str(thumos_small / "state_dict.npz"), str(out)]) == 0
    return out


def assert_bit_equal(a: dict, b: dict) -> None:
    """Same keys in the same order, same shapes, float32, same bytes."""
    assert list(a) == list(b)
    for k in a:
        x, y = np.asarray(a[k]), np.asarray(b[k])
        assert x.dtype == y.dtype == np.float32, k
        assert x.shape == y.shape, (k, x.shape, y.shape)
        assert x.tobytes() == y.tobytes(), k


def flat(params) -> dict:
    """A parameter tree as {path: array}, sorted (trees from init and from checkpoints differ in order)."""
    return dict(sorted(("/".join(p), np.asarray(v)) for p, v in traverse_util.flatten_dict(params).items()))


def random_params(cfg, seed=0) -> dict:
    rng = np.random.default_rng(seed)
    shapes = abstract_params(cfg)
    return jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape, dtype=np.float32), shapes)


# ---------------------------------------------------------------------------------------------------
# Layouts and the reference format


@pytest.mark.parametrize(
    "layout, flax_shape, torch_shape",
    [
        (SAME, (5,), (5,)),
        (SAME, (), ()),
        (CONV, (3, 4, 6), (6, 4, 3)),
        (CONV_TRANSPOSE, (3, 4, 6), (4, 6, 3)),
        (POINTWISE, (4, 6), (6, 4, 1)),
        (CHANNEL, (6,), (1, 6, 1)),
        (DEPTHWISE_1, (6,), (6, 1, 1)),
        (DEPTHWISE, (3, 6), (6, 1, 3)),
        (COMPLEX, (2, 6), (2, 6, 1)),
    ],
    ids=lambda x: getattr(x, "name", None),
)
def test_layouts_are_exact_inverses(layout, flax_shape, torch_shape):
    w = np.random.default_rng(0).standard_normal(torch_shape).astype(np.float32)
    assert layout.torch_shape(flax_shape) == torch_shape
    assert layout.to_flax(w).shape == flax_shape
    np.testing.assert_array_equal(layout.to_torch(layout.to_flax(w)), w)
    f = np.random.default_rng(1).standard_normal(flax_shape).astype(np.float32)
    np.testing.assert_array_equal(layout.to_flax(layout.to_torch(f)), f)


def test_export_of_the_converted_fixture_is_its_state_dict(thumos_small, converted, tmp_path, capsys):
    """export-torch(convert(fixture)) gives back state_dict.npz: keys (and their order), shapes, dtypes, bits."""
    fixture = dict(np.load(thumos_small / "state_dict.npz"))
    config = str(thumos_small / "config.yaml")
    assert main(["export-torch", config, str(converted), str(tmp_path / "out.pth.tar")]) == 0
    assert "212 tensors" in capsys.readouterr().out
    ckpt = _read_torch_zip(tmp_path / "out.pth.tar")
    assert list(ckpt) == ["epoch", "state_dict", "state_dict_ema"]
    assert ckpt["epoch"] == 0 and isinstance(ckpt["state_dict_ema"], OrderedDict)
    assert_bit_equal(ckpt["state_dict_ema"], fixture)
    assert_bit_equal(ckpt["state_dict"], fixture)  # a converted checkpoint has one weight set

    assert main(["export-torch", config, str(converted), str(tmp_path / "out.npz"), "--format", "npz"]) == 0
    with np.load(tmp_path / "out.npz", allow_pickle=False) as npz:
        assert_bit_equal({k: npz[k] for k in npz.files}, fixture)


def test_convert_of_export_is_the_identity(cfg, thumos_small, tmp_path):
    params = convert_checkpoint(cfg, thumos_small / "state_dict.npz")
    state = {"module." + k: v for k, v in state_dict_from_params(cfg, params).items()}
    write_torch_checkpoint(tmp_path / "x.pth.tar", {"epoch": 3, "state_dict": state, "state_dict_ema": state})
    again = convert_checkpoint(cfg, tmp_path / "x.pth.tar")
    assert_bit_equal(flat(again), flat(params))


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_every_config_round_trips_with_random_weights(name, tmp_path):
    """convert(export(params)) == params through the file, and the keys are exactly those conversion needs."""
    cfg = load_config(CONFIGS / f"{name}.yaml")
    params = random_params(cfg)
    state = state_dict_from_params(cfg, params)
    shapes = traverse_util.flatten_dict(abstract_params(cfg))
    expected = {torch_name(p)[0]: torch_name(p)[1].torch_shape(tuple(s.shape)) for p, s in shapes.items()}
    assert {k: v.shape for k, v in state.items()} == expected
    assert len(state) == REFERENCE[name][1]  # the reference's state_dict entry count (REFERENCE.md 2.3)
    assert_bit_equal(flat(params_from_state_dict(cfg, state)), flat(params))  # conversion accepts every key

    prefixed = OrderedDict(("module." + k, v) for k, v in state.items())
    path = tmp_path / f"{name}.pth.tar"
    write_torch_checkpoint(path, {"epoch": 0, "state_dict_ema": prefixed})
    assert_bit_equal(flat(convert_checkpoint(cfg, path)), flat(params))


@pytest.mark.parametrize("layout", ["packed", "tree"])
def test_raw_and_ema_weights_of_a_trained_checkpoint(cfg, thumos_small, tmp_path, layout):
    """A checkpoint of `cltdr train`: state_dict from the live weights, state_dict_ema from the EMA ones; "tree":
    as versions before the packed training state wrote it."""
    import orbax.checkpoint as ocp

    from cltdr_jax.checkpoint import manager, save_training
    from cltdr_jax.optim import make_optimizer
    from cltdr_jax.train import TrainState

    tx, _ = make_optimizer(cfg, 10)
    raw = random_params(cfg)
    ema = convert_checkpoint(cfg, thumos_small / "state_dict.npz")
    state = TrainState(
        step=np.int32(30),
        params=raw,
        ema_params=ema,
        opt_state=tx.init(raw),
        loss_norm=np.float32(100.0),
        rng=np.zeros(2, np.uint32),
    )
    mngr = manager(tmp_path / "ckpt")
    meta = {"step": 30, "epoch": 3.0, "config": cfg.to_dict()}
    if layout == "packed":
        save_training(mngr, state, meta)
    else:
        items = {"params": ocp.args.StandardSave(ema), "train_state": ocp.args.StandardSave(state)}
        mngr.save(30, args=ocp.args.Composite(**items, meta=ocp.args.JsonSave(meta)))
        mngr.wait_until_finished()
    mngr.close()

    config = str(thumos_small / "config.yaml")
    assert main(["export-torch", config, str(tmp_path / "ckpt"), str(tmp_path / "t.pth.tar")]) == 0
    ckpt = _read_torch_zip(tmp_path / "t.pth.tar")
    assert ckpt["epoch"] == 3
    assert_bit_equal(ckpt["state_dict_ema"], dict(np.load(thumos_small / "state_dict.npz")))
    assert_bit_equal(ckpt["state_dict"], {"module." + k: v for k, v in state_dict_from_params(cfg, raw).items()})
    args = ["export-torch", config, str(tmp_path / "ckpt"), str(tmp_path / "raw.npz"), "--format", "npz"]
    assert main([*args, "--weights", "raw"]) == 0
    assert_bit_equal(flat(convert_checkpoint(cfg, tmp_path / "raw.npz")), flat(raw))


def test_torch_file_is_written_as_torch_writes_it(shared_dir, tmp_path, without_torch):
    """The fixture's whole checkpoint (torch-written: optimizer, scheduler) through our writer: read back
    unchanged, the same globals and no opcode torch's pickler does not use, 64-byte aligned entries named as
    torch names them, the same bytes when written twice."""
    source = shared_dir / "fixtures" / "thumos_small" / "checkpoint.pth.tar"
    original = _read_torch_zip(source)
    for name in ("a.pth.tar", "b/a.pth.tar"):
        assert write_torch_checkpoint(tmp_path / name, original) in ("cltdr_jax", "torch")
    back = _read_torch_zip(tmp_path / "a.pth.tar")
    assert list(back) == list(original)
    assert back["scheduler"] == original["scheduler"] and back["epoch"] == original["epoch"]
    assert back["optimizer"]["param_groups"] == original["optimizer"]["param_groups"]
    for key in ("state_dict", "state_dict_ema"):
        assert_bit_equal(back[key], original[key])
    if (tmp_path / "a.pth.tar").read_bytes()[:2] != b"PK":
        pytest.fail("not a zip archive")
    assert write_torch_checkpoint(tmp_path / "c.pth.tar", {}) == "cltdr_jax"

    def pickle_of(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            return z.read(next(n for n in names if n.endswith("data.pkl"))), names

    theirs, their_names = pickle_of(source)
    ours, our_names = pickle_of(tmp_path / "a.pth.tar")
    ops = {op.name for op, _, _ in pickletools.genops(ours)}
    assert ops <= {op.name for op, _, _ in pickletools.genops(theirs)}
    globals_ = {arg for op, arg, _ in pickletools.genops(ours) if op.name == "GLOBAL"}
    assert globals_ == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch FloatStorage"}
    assert [n.replace("a.pth/", "") for n in our_names] == [n.replace("checkpoint.pth/", "") for n in their_names]
    data = (tmp_path / "a.pth.tar").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.pth.tar") as z:
        for info in z.infolist():
            name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26 : info.header_offset + 30])
            assert (info.header_offset + 30 + name_len + extra_len) % 64 == 0, info.filename
    assert (tmp_path / "a.pth.tar").read_bytes() == (tmp_path / "b" / "a.pth.tar").read_bytes()


def test_torch_loads_what_our_writer_wrote(shared_dir, tmp_path, monkeypatch):
    """Real torch (the extra; CI installs it) reads our torch-free file with weights_only=True, bit for bit;
    and what torch writes (the path taken when it is installed) our reader reads back."""
    torch = pytest.importorskip("torch", reason="the torch extra is not installed (CI installs it)")
    original = _read_torch_zip(shared_dir / "fixtures" / "thumos_small" / "checkpoint.pth.tar")
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "torch", None)
        assert write_torch_checkpoint(tmp_path / "ours.pth.tar", original) == "cltdr_jax"
    loaded = torch.load(tmp_path / "ours.pth.tar", map_location="cpu", weights_only=True)
    assert list(loaded) == list(original) and loaded["epoch"] == original["epoch"]
    for key in ("state_dict", "state_dict_ema"):
        assert list(loaded[key]) == list(original[key])
        for name, value in original[key].items():
            np.testing.assert_array_equal(loaded[key][name].numpy(), value)
    assert write_torch_checkpoint(tmp_path / "theirs.pth.tar", original) == "torch"
    back = _read_torch_zip(tmp_path / "theirs.pth.tar")
    for key in ("state_dict", "state_dict_ema"):
        assert_bit_equal(back[key], original[key])


def test_writer_refuses_what_torch_would_not_load(tmp_path, without_torch):
    with pytest.raises(CheckpointError, match="cannot write a set"):
        write_torch_checkpoint(tmp_path / "x.pth.tar", {"a": {1, 2}})
    with pytest.raises(CheckpointError, match="dtype complex64"):
        write_torch_checkpoint(tmp_path / "x.pth.tar", {"a": np.zeros(2, np.complex64)})
    assert not (tmp_path / "x.pth.tar").exists() and not list(tmp_path.iterdir())


def test_export_torch_of_another_config_is_a_clear_error(thumos_small, converted, tmp_path, capsys):
    args = ["export-torch", str(thumos_small / "config.yaml"), str(converted), str(tmp_path / "x.pth.tar")]
    assert main([*args, "--set", "model.head_dim=64"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cltdr export-torch: error:") and "does not fit" in err
    assert not (tmp_path / "x.pth.tar").exists()


# ---------------------------------------------------------------------------------------------------
# Serialized XLA programs


@pytest.fixture(scope="module")
def exported(thumos_small, converted, tmp_path_factory):
    """`cltdr export` of the fixture for the padded lengths of its validation split (3 programs)."""
    out = tmp_path_factory.mktemp("exported") / "thumos_small"
    with contextlib.chdir(thumos_small):  # the config's paths are relative to the working directory
        code = main(["export", "config.yaml", str(converted), str(out), "--lengths", "split", "--split", "validation"])
    assert code == 0
    return out


def test_manifest(exported, cfg):
    m = read_manifest(exported)
    assert m["lengths"] == [256, 416, 672]  # the validation videos' padded lengths (T = 120 ... 650)
    assert m["platforms"] == ["cpu", "cuda"] and m["dtype"] == "float32" and m["batch_size"] == 1
    assert m["strides"] == list(cfg.strides) and m["input_dim"] == 32 and len(m["class_names"]) == 5
    assert sorted(p.name for p in exported.iterdir()) == [
        "manifest.json",
        "network_T256.bin",
        "network_T416.bin",
        "network_T672.bin",
    ]


@pytest.fixture(scope="module")
def model_predictor(converted, cfg):
    """The in-process model (one Predictor, so its compiled programs serve every test here)."""
    from cltdr_jax.checkpoint import load_params
    from cltdr_jax.inference import Predictor

    return Predictor(cfg, load_params(converted, cfg)[0])


@pytest.mark.slow
def test_exported_programs_give_the_models_detections_in_a_fresh_process(thumos_small, exported, cfg, model_predictor):
    """`cltdr predict --exported` in a new interpreter whose Flax model raises if called: the same JSON."""
    from cltdr_jax.predict import predict_split

    with contextlib.chdir(thumos_small):
        expected = predict_split(cfg, None, "validation", predictor=model_predictor).results_json
    out = exported.parent / "exported_detections.json"
    script = (
        "import sys\n"
        "from cltdr_jax.model.detector import CLTDRGMG\n"
        "def refuse(*a, **k): raise AssertionError('the Flax model ran')\n"
        "CLTDRGMG.__call__ = refuse\n"
        "from cltdr_jax.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = ["predict", "config.yaml", "--exported", str(exported), "--split", "validation", "--out", str(out)]
    done = subprocess.run([sys.executable, "-c", script, *args], cwd=thumos_small, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(out.read_text()) == json.loads(json.dumps(expected))


def test_exported_programs_on_feature_files(thumos_small, exported, cfg, model_predictor):
    from cltdr_jax.predict import predict_files

    files = [str(thumos_small / "features" / "video_validation_0001299.npy")]
    ours = predict_files(cfg, None, files, fps=30.0, predictor=ExportedPredictor(exported, cfg))
    assert ours.results_json == predict_files(cfg, None, files, fps=30.0, predictor=model_predictor).results_json


def test_a_length_without_program_is_a_clear_error(exported, cfg):
    predictor = ExportedPredictor(exported, cfg)
    assert predictor.padded_length(np.zeros((650, 32), np.float32), "v") == 672
    with pytest.raises(DataError, match=r"video 'v': padded length 320 has no exported program in .*256, 416, 672"):
        predictor.padded_length(np.zeros((300, 32), np.float32), "v")


def test_an_export_of_another_config_is_refused(exported, thumos_small, tmp_path, capsys):
    other = load_config(thumos_small / "config.yaml", ["model.head_dim=64"])
    with pytest.raises(CheckpointError, match=r"another config.*\n  model.head_dim: 128 in the export, 64"):
        ExportedPredictor(exported, other)
    args = ["predict", str(thumos_small / "config.yaml"), "--exported", str(exported), "--out", str(tmp_path / "x")]
    assert main([*args, "--set", "model.num_bins=8"]) == 2
    assert "another config" in capsys.readouterr().err


def test_corrupt_or_foreign_exports_are_refused(exported, cfg, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    program = bad / "network_T416.bin"
    data = bytearray(program.read_bytes())
    data[len(data) // 2] ^= 0xFF
    program.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="network_T416.bin: corrupt program"):
        ExportedPredictor(bad, cfg)
    program.unlink()
    with pytest.raises(CheckpointError, match="network_T416.bin: missing program"):
        ExportedPredictor(bad, cfg)
    manifest = bad / "manifest.json"
    m = json.loads(manifest.read_text())
    manifest.write_text(json.dumps({**m, "format_version": 99}))
    with pytest.raises(CheckpointError, match="format version 99"):
        ExportedPredictor(bad, cfg)
    manifest.write_text(manifest.read_text()[:100])
    with pytest.raises(CheckpointError, match="unreadable manifest"):
        ExportedPredictor(bad, cfg)
    manifest.unlink()
    with pytest.raises(CheckpointError, match="no manifest.json"):
        ExportedPredictor(bad, cfg)


def test_export_argument_errors(thumos_small, converted, tmp_path, capsys):
    config = str(thumos_small / "config.yaml")
    export = ["export", config, str(converted), str(tmp_path / "x")]
    assert main([*export, "--lengths", "300"]) == 2
    assert "300 is not a padded length" in capsys.readouterr().err
    assert main([*export, "--lengths", "256", "--platforms", "cpu,x"]) == 2
    assert "unknown platform" in capsys.readouterr().err
    assert main(["predict", config, "--out", str(tmp_path / "d.json")]) == 2
    assert "checkpoint_dir argument is required (or --exported DIR)" in capsys.readouterr().err


def test_stablehlo_modules_for_other_runtimes(thumos_small, converted, tmp_path):
    out = tmp_path / "x"
    args = ["export", str(thumos_small / "config.yaml"), str(converted), str(out), "--lengths", "256"]
    assert main([*args, "--platforms", "cpu", "--stablehlo"]) == 0
    entry = read_manifest(out)["programs"]["256"]
    module = (out / entry["stablehlo"]["file"]).read_bytes()
    assert module.startswith(b"ML\xefR")  # MLIR bytecode
    assert hashlib.sha256(module).hexdigest() == entry["stablehlo"]["sha256"]
    assert main([*args, "--platforms", "cpu"]) == 0  # exporting again replaces the earlier export
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "network_T256.bin"]


@pytest.mark.slow
def test_bfloat16_programs_compute_as_the_bfloat16_model(thumos_small, converted, tmp_path):
    from cltdr_jax.checkpoint import load_params
    from cltdr_jax.inference import Predictor
    from cltdr_jax.predict import predict_files

    out = tmp_path / "bf16"
    args = ["export", str(thumos_small / "config.yaml"), str(converted), str(out), "--lengths", "256"]
    assert main([*args, "--platforms", "cpu", "--dtype", "bfloat16"]) == 0
    assert read_manifest(out)["dtype"] == "bfloat16"
    cfg16 = load_config(thumos_small / "config.yaml", ["inference.dtype=bfloat16"])
    model = Predictor(cfg16, load_params(converted, cfg16)[0], batch_size=1)
    files = [str(thumos_small / "features" / "video_test_0001007.npy")]
    ours = predict_files(cfg16, None, files, fps=30.0, predictor=ExportedPredictor(out, cfg16))
    assert ours.results_json == predict_files(cfg16, None, files, fps=30.0, predictor=model).results_json
