"""The Flax I3D against the public PyTorch port (`../shared/fixtures/i3d_small`), its padding rule on
shapes the fixture does not cover, and the port's weight files in torch's legacy format (no torch)."""

from __future__ import annotations

import collections
import contextlib
import importlib.util
import pickle
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cltdr_jax.errors import CheckpointError
from cltdr_jax.torch_files import _read_torch_legacy, read_state_dict
from cltdr_jax.video import i3d
from cltdr_jax.video.i3d import I3D, i3d_params_from_torch, load_i3d_weights, torch_key_shapes

CHANNELS = {"rgb": 3, "flow": 2}


@pytest.fixture(scope="module")
def fixture(shared_dir):
    """The fixture's `weights` module (regenerates the weights and inputs) and its golden outputs."""
    folder = shared_dir / "fixtures" / "i3d_small"
    spec = importlib.util.spec_from_file_location("i3d_small_weights", folder / "weights.py")
    weights = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(weights)
    with np.load(folder / "outputs.npz") as outputs:
        return weights, dict(outputs)


@pytest.fixture(scope="module")
def state_dicts(fixture):
    weights, _ = fixture
    out = {}
    for stream in CHANNELS:
        out[stream] = weights.state_dict(stream)
        weights.check(out[stream], stream)  # another numpy drawing other numbers fails here, not in the comparison
    return out


def _rel(ours: np.ndarray, ref: np.ndarray) -> float:
    """Largest absolute difference relative to the reference's largest magnitude."""
    return float(np.abs(np.asarray(ours, np.float64) - ref).max() / np.abs(ref).max())


def _run(variables, x, channels, method=None):
    """A fresh jit each call, so a monkeypatched padding rule is traced again rather than reused."""
    model = I3D(in_channels=channels)
    return jax.jit(lambda v, x: model.apply(v, x, method=method, mutable=["intermediates"]))(variables, x)


@pytest.mark.parametrize("stream", ["rgb", "flow"])
def test_matches_the_pytorch_port(fixture, state_dicts, stream):
    weights, outputs = fixture
    variables = i3d_params_from_torch(state_dicts[stream])
    x = jnp.asarray(weights.clip(stream, "visible").transpose(0, 2, 3, 4, 1))  # [B, C, T, H, W] -> channels last
    feats, state = _run(variables, x, CHANNELS[stream])
    logits, _ = _run(variables, x, CHANNELS[stream], method=I3D.logits)

    ref = outputs[f"visible/{stream}/features"]  # [B, 1024, T', H', W']
    assert feats.shape == (2, 1, 1, 1, 1024)
    assert _rel(feats, ref.transpose(0, 2, 3, 4, 1)) < 1e-5
    ref = outputs[f"visible/{stream}/logits"]  # [B, 400, T'] after the port's spatial squeeze
    assert logits.shape == (2, 1, 1, 1, 400)
    assert _rel(logits[:, :, 0, 0], ref.transpose(0, 2, 1)) < 1e-5
    endpoints = state["intermediates"]["endpoints"][0]
    assert sorted(endpoints) == sorted(i3d.ENDPOINTS)  # jit returns dicts with sorted keys
    for name, value in endpoints.items():
        ref = outputs[f"visible/{stream}/endpoint_mean/{name}"]
        assert _rel(np.asarray(value, np.float64).mean(axis=(1, 2, 3)), ref) < 1e-5, name
    # The extractor's vector: the same numbers for the protocol's 16 x 224 x 224 clip.
    clip, _ = _run(variables, x, CHANNELS[stream], method=I3D.clip_features)
    assert _rel(clip, outputs[f"visible/{stream}/features"][:, :, 0, 0, 0]) < 1e-5


def test_symmetric_padding_does_not_match(fixture, state_dicts, monkeypatch):
    """The port pads stride-2 layers asymmetrically (front = pad // 2); symmetric padding keeps every shape
    but not the numbers, so the parity test above would catch it."""
    weights, outputs = fixture
    monkeypatch.setattr(i3d, "same_padding", lambda size, kernel, stride: ((kernel - 1) // 2, (kernel - 1) // 2))
    variables = i3d_params_from_torch(state_dicts["rgb"])
    x = jnp.asarray(weights.clip("rgb", "visible").transpose(0, 2, 3, 4, 1))
    feats, _ = _run(variables, x, 3)
    ref = outputs["visible/rgb/features"].transpose(0, 2, 3, 4, 1)
    assert feats.shape == ref.shape
    assert _rel(feats, ref) > 1e-2


def test_same_padding_is_the_ports_rule():
    # compute_pad: max(k - s, 0) when size % s == 0, else max(k - size % s, 0); front = pad // 2.
    assert i3d.same_padding(224, 7, 2) == (2, 3)
    assert i3d.same_padding(225, 7, 2) == (3, 3)
    assert i3d.same_padding(16, 3, 1) == (1, 1)
    assert i3d.same_padding(7, 2, 2) == (0, 1)
    assert i3d.same_padding(8, 2, 2) == (0, 0)
    assert i3d.same_padding(5, 1, 1) == (0, 0)


def _numpy_conv(x, w, stride):
    """Float64 re-derivation of the port's Unit3D conv: x [T, H, W, C], w torch [O, I, kt, kh, kw]."""
    pads = [i3d.same_padding(n, k, s) for n, k, s in zip(x.shape[:3], w.shape[2:], stride, strict=True)]
    x = np.pad(x, [*pads, (0, 0)])
    kt, kh, kw = w.shape[2:]
    out_shape = [(n - k) // s + 1 for n, k, s in zip(x.shape[:3], (kt, kh, kw), stride, strict=True)]
    out = np.zeros((*out_shape, w.shape[0]))
    for t in range(out_shape[0]):
        for h in range(out_shape[1]):
            for v in range(out_shape[2]):
                t0, h0, v0 = t * stride[0], h * stride[1], v * stride[2]
                patch = x[t0 : t0 + kt, h0 : h0 + kh, v0 : v0 + kw]  # [kt, kh, kw, C]
                out[t, h, v] = np.einsum("thwc,octhw->o", patch, w)
    return out


@pytest.mark.parametrize("shape", [(5, 9, 11), (6, 10, 13), (3, 7, 7)])
def test_conv_and_pool_padding_on_odd_sizes(shape):
    """Sizes the fixture does not cover (odd, not divisible by the stride) against float64 numpy."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, *shape, 3))
    w = rng.standard_normal((4, 3, 7, 7, 7)) * 0.1
    unit = i3d.Unit3D(4, (7, 7, 7), (2, 2, 2), batch_norm=False, relu=False)
    ours = unit.apply({"params": {"conv3d": {"kernel": w.transpose(2, 3, 4, 1, 0)}}}, jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(np.asarray(ours[0]), _numpy_conv(x[0], w, (2, 2, 2)), atol=1e-4)

    relu = np.maximum(x, 0)  # max-pool inputs follow a ReLU in the network
    for kernel, stride in (((3, 3, 3), (2, 2, 2)), ((1, 3, 3), (1, 2, 2)), ((2, 2, 2), (2, 2, 2))):
        pads = [i3d.same_padding(n, k, s) for n, k, s in zip(shape, kernel, stride, strict=True)]
        padded = np.pad(relu[0], [*pads, (0, 0)])
        out_shape = [(n - k) // s + 1 for n, k, s in zip(padded.shape[:3], kernel, stride, strict=True)]
        ref = np.zeros((*out_shape, 3))
        for idx in np.ndindex(*out_shape):
            lo = [i * s for i, s in zip(idx, stride, strict=True)]
            ref[idx] = padded[lo[0] : lo[0] + kernel[0], lo[1] : lo[1] + kernel[1], lo[2] : lo[2] + kernel[2]].max(
                axis=(0, 1, 2)
            )
        ours = i3d.max_pool_same(jnp.asarray(relu, jnp.float32), kernel, stride)
        np.testing.assert_allclose(np.asarray(ours[0]), ref, atol=1e-6)


@pytest.mark.parametrize(("frames", "size"), [(16, 224), (17, 225), (9, 193), (64, 256), (24, 250)])
def test_output_shapes_follow_the_port(frames, size):
    """T' = ceil(T / 8) - 1, H' = ceil(H / 32) - 6: the three stride-2 stages pad up, the pool does not."""
    variables = jax.eval_shape(
        lambda x: I3D(in_channels=2).init(jax.random.key(0), x, method=I3D.logits),
        jax.ShapeDtypeStruct((1, frames, size, size, 2), jnp.float32),
    )
    x = jax.ShapeDtypeStruct((1, frames, size, size, 2), jnp.float32)
    feats = jax.eval_shape(lambda v, x: I3D(in_channels=2).apply(v, x), variables, x)
    logits = jax.eval_shape(lambda v, x: I3D(in_channels=2).apply(v, x, method=I3D.logits), variables, x)
    t, h = -(-frames // 8) - 1, -(-size // 32) - 6
    assert feats.shape == (1, t, h, h, 1024)
    assert logits.shape == (1, t, h, h, 400)


def test_key_layout_is_the_ports(shared_dir):
    import json

    keys = json.loads((shared_dir / "fixtures" / "i3d_small" / "keys.json").read_text())
    for stream, channels in CHANNELS.items():
        expected = {k: tuple(v["shape"]) for k, v in keys[stream].items() if not k.endswith("num_batches_tracked")}
        assert torch_key_shapes(channels) == expected


# ---------------------------------------------------------------------------------------------------
# torch's legacy file format, written here without torch


@contextlib.contextmanager
def _fake_torch():
    """Importable stand-ins for the torch globals a state_dict pickle names, only while writing."""
    saved = {name: sys.modules.get(name) for name in ("torch", "torch._utils")}
    torch, utils = types.ModuleType("torch"), types.ModuleType("torch._utils")
    torch._utils = utils

    def rebuild(*args):
        raise AssertionError("never called: only pickled by name")

    rebuild.__module__, rebuild.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = rebuild
    for name in ("FloatStorage", "LongStorage", "DoubleStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    sys.modules.update({"torch": torch, "torch._utils": utils})
    try:
        yield torch, utils
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


class _Storage:
    def __init__(self, key: str, data: np.ndarray):
        self.key, self.data = key, data


class _Tensor:
    """Pickles as torch 1.x-2.x pickles a tensor: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, (*self.args, False, collections.OrderedDict())


_STORAGE_NAMES = {np.float32: "FloatStorage", np.int64: "LongStorage", np.float64: "DoubleStorage"}


def write_legacy(path, tensors: dict, views: dict | None = None) -> None:
    """torch.save(tensors, path, _use_new_zipfile_serialization=False), byte layout and all:
    magic number, protocol 1001, sys info, the data pickle (storages as persistent ids), the sorted storage
    keys, then per storage an int64 element count and its raw little-endian bytes."""
    storages: dict[str, _Storage] = {}
    views = views or {}
    with _fake_torch() as (torch, _), open(path, "wb") as f:
        objects = collections.OrderedDict()
        for name, value in tensors.items():
            if isinstance(value, _Tensor):
                objects[name] = value
                continue
            value = np.array(value, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)
            storage = _Storage(str(140000000000 + 64 * len(storages)), value.reshape(-1))
            storages[storage.key] = storage
            stride = tuple(s // value.itemsize for s in value.strides)
            objects[name] = _Tensor(storage, 0, value.shape, stride)
        for tensor in objects.values():
            storages.setdefault(tensor.args[0].key, tensor.args[0])

        def persistent_id(obj):
            if isinstance(obj, _Storage):
                storage_type = getattr(torch, _STORAGE_NAMES[obj.data.dtype.type])
                return ("storage", storage_type, obj.key, "cpu", obj.data.size, views.get(obj.key))
            return None

        for header in (0x1950A86A20F9469CFC6C, 1001, {"protocol_version": 1001, "little_endian": True}):
            pickle.dump(header, f, protocol=2)
        pickler = pickle.Pickler(f, protocol=2)
        pickler.persistent_id = persistent_id
        pickler.dump(objects)
        keys = sorted(storages)
        pickle.dump(keys, f, protocol=2)
        for key in keys:
            data = storages[key].data
            f.write(np.int64(data.size).tobytes())
            f.write(data.astype(data.dtype.newbyteorder("<")).tobytes())


def test_legacy_file_of_the_fixture_weights(tmp_path, state_dicts):
    """The port's .pt files are in the legacy format: write one with the fixture's weights and load it."""
    path = tmp_path / "rgb_imagenet.pt"
    write_legacy(path, state_dicts["rgb"])
    read = _read_torch_legacy(path)  # our reader even where torch is installed
    assert list(read) == list(state_dicts["rgb"])
    for key, value in state_dicts["rgb"].items():
        assert read[key].dtype == value.dtype and read[key].shape == value.shape
        np.testing.assert_array_equal(read[key], value)
    model, variables = load_i3d_weights(path, "rgb")
    assert (model.in_channels, model.num_classes) == (3, 400)
    expected = i3d_params_from_torch(state_dicts["rgb"])
    for (p1, a), (p2, b) in zip(
        jax.tree_util.tree_leaves_with_path(variables), jax.tree_util.tree_leaves_with_path(expected), strict=True
    ):
        assert p1 == p2
        np.testing.assert_array_equal(a, b)


def test_legacy_storages_shared_strided_and_viewed(tmp_path):
    base = np.arange(24, dtype=np.float32)
    shared = _Storage("1", base)
    tensors = {
        "first": _Tensor(shared, 0, (2, 3), (3, 1)),
        "second_transposed": _Tensor(shared, 6, (3, 2), (1, 3)),  # a non-contiguous view of the same storage
        "scalar": np.array(7, np.int64),
        "double": np.linspace(0, 1, 5),
        "viewed": _Tensor(_Storage("9", np.arange(10, dtype=np.float32)), 1, (2,), (1,)),
    }
    path = tmp_path / "legacy.pt"
    write_legacy(path, tensors, views={"9": ("9v", 4, 5)})  # storage 9 viewed from element 4, 5 elements
    read = _read_torch_legacy(path)
    np.testing.assert_array_equal(read["first"], base[:6].reshape(2, 3))
    np.testing.assert_array_equal(read["second_transposed"], base[6:12].reshape(2, 3).T)
    assert read["scalar"].shape == () and int(read["scalar"]) == 7
    np.testing.assert_array_equal(read["double"], np.linspace(0, 1, 5))
    np.testing.assert_array_equal(read["viewed"], [5.0, 6.0])
    assert read_state_dict(path)["first"].dtype == np.float32


def test_legacy_reader_refuses_code_and_garbage(tmp_path):
    evil = tmp_path / "evil.pt"
    with open(evil, "wb") as f:
        for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}):
            pickle.dump(header, f, protocol=2)
        f.write(b"cos\nsystem\n(S'echo pwned'\ntR.")  # os.system('echo pwned') in protocol-0 opcodes
    with pytest.raises(CheckpointError, match=r"evil\.pt: refusing to unpickle os\.system"):
        _read_torch_legacy(evil)
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00\x01 definitely not a checkpoint" * 10)
    with pytest.raises(CheckpointError, match=r"junk\.pt: not a torch file"):
        _read_torch_legacy(junk)
    truncated = tmp_path / "truncated.pt"
    write_legacy(truncated, {"w": np.ones(100, np.float32)})
    truncated.write_bytes(truncated.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match=r"truncated\.pt: truncated file"):
        _read_torch_legacy(truncated)


def _port_state_dict(channels: int, num_classes: int = 400) -> dict[str, np.ndarray]:
    return {k: np.zeros(s, np.float32) for k, s in torch_key_shapes(channels, num_classes).items()}


def test_wrong_stream_and_wrong_network(tmp_path):
    flow = tmp_path / "flow_imagenet.npz"
    np.savez(flow, **_port_state_dict(2))
    with pytest.raises(CheckpointError, match=r"flow_imagenet\.npz: these are flow I3D weights .* rgb stream needs 3"):
        load_i3d_weights(flow, "rgb")
    model, _ = load_i3d_weights(flow, "flow")
    assert model.in_channels == 2

    resnet = tmp_path / "resnet50.npz"
    np.savez(resnet, **{"conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "fc.weight": np.zeros((10, 4))})
    with pytest.raises(CheckpointError, match=r"resnet50\.npz: not the weights of the I3D port"):
        load_i3d_weights(resnet, "rgb")

    broken = _port_state_dict(3)
    del broken["Mixed_4c.b2b.bn.running_var"]
    broken["Mixed_5c.b0.conv3d.weight"] = np.zeros((384, 800, 1, 1, 1), np.float32)
    broken["extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(CheckpointError) as err:
        i3d_params_from_torch(broken, source="mine.pt")
    msg = str(err.value)
    assert msg.startswith("mine.pt: not the weights of the I3D port")
    assert "Mixed_4c.b2b.bn.var" in msg and "Mixed_5c.b0.conv3d.weight: shape [384, 800, 1, 1, 1]" in msg
    assert "unexpected key 'extra.weight'" in msg


def test_other_class_counts_load():
    """The port also ships Charades weights (157 classes): features do not depend on the head."""
    variables = i3d_params_from_torch(_port_state_dict(3, 157))
    assert variables["params"]["logits"]["conv3d"]["kernel"].shape == (1, 1, 1, 1024, 157)
