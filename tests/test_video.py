"""From a video file to features and detections: resampling, flow, `cltdr extract`, `cltdr detect`, bad input.

Videos are made here (moving shapes, encoded with PyAV); the I3D weights are seeded random ones in the
port's key layout; frames are small (--size 64 --resize 72) so the network runs in seconds on a CPU.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_OVERRIDES

from cltdr_jax.cli import main
from cltdr_jax.video.extract import ExtractOptions, I3DFeatures, extract_videos, num_windows
from cltdr_jax.video.frames import TVL1, FrameProtocol, frame_inputs, resampled_frames
from cltdr_jax.video.i3d import i3d_params_from_torch, random_torch_weights

# Third-party decoders: skipped in a plain clone, installed by the `dev` extra in CI.
av = pytest.importorskip("av", reason="needs PyAV (pip install cltdr-jax[video])")
pytest.importorskip("cv2", reason="needs OpenCV contrib (pip install cltdr-jax[video])")

REPO = Path(__file__).resolve().parents[1]
SMALL = ["--size", "64", "--resize", "72"]


def write_video(path: Path, frames: int, fps: int = 30, size: tuple[int, int] = (96, 80), index_in_gray=False):
    """A disc moving right and a bar moving left over a blue background, mpeg4 at high quality.

    With `index_in_gray` every pixel of frame i is 4 * i instead (to read back which frame was picked)."""
    w, h = size
    container = av.open(str(path), "w")
    stream = container.add_stream("mpeg4", rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    stream.bit_rate = 4_000_000
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(frames):
        if index_in_gray:
            image = np.full((h, w, 3), 4 * i, np.uint8)
        else:
            image = np.zeros((h, w, 3), np.uint8)
            image[..., 2] = 60
            image[(xx - 10 - 2 * i) ** 2 + (yy - 30) ** 2 < 100] = (255, 200, 0)
            image[20:40, max(w - 30 - i, 0) : max(w - 10 - i, 0)] = (0, 255, 0)
        for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


@pytest.fixture(scope="module")
def weights(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("i3d_weights")
    paths = {}
    for seed, (stream, channels) in enumerate((("rgb", 3), ("flow", 2))):
        paths[stream] = folder / f"{stream}_random.npz"
        np.savez(paths[stream], **random_torch_weights(channels, seed))
    return paths


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("videos")
    return {
        "long": write_video(folder / "shapes_long.mp4", 40),
        "short": write_video(folder / "shapes_short.mkv", 27, fps=25, size=(80, 96)),
    }


@pytest.fixture(autouse=True)
def _compilation_cache(tmp_path_factory, monkeypatch):
    """The commands turn on the on-disk compilation cache: keep it out of the user's home."""
    monkeypatch.setenv("CLTDR_XLA_CACHE", str(tmp_path_factory.getbasetemp() / "xla_cache"))


def _weight_args(weights) -> list[str]:
    return ["--rgb-weights", str(weights["rgb"]), "--flow-weights", str(weights["flow"])]


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


# ---------------------------------------------------------------------------------------------------
# Frames and flow


@pytest.mark.parametrize(("fps", "expected"), [(30, list(range(12))), (15, [0, 2, 4, 6, 8, 10])])
def test_resampling_picks_the_nearest_frame(tmp_path, fps, expected):
    path = write_video(tmp_path / "index.mp4", 12, index_in_gray=True)
    picked = [int(round(f.to_ndarray(format="gray").mean() / 4)) for f in resampled_frames(path, fps)]
    assert picked == expected


def test_resampling_up_repeats_frames_and_ties_go_earlier(tmp_path):
    path = write_video(tmp_path / "index.mp4", 6, fps=20, index_in_gray=True)
    picked = [int(round(f.to_ndarray(format="gray").mean() / 4)) for f in resampled_frames(path, 30)]
    # 6 frames at 20 fps last 0.3 s -> 9 frames at 30 fps; k / 30 nearest of i / 20 (k = 3: 0.1 s = frame 2).
    assert picked == [0, 1, 1, 2, 3, 3, 4, 5, 5]


def test_frame_inputs_shapes_ranges_and_flow_direction(videos):
    protocol = FrameProtocol(resize=72, size=64)
    frames = list(frame_inputs(videos["long"], protocol))
    assert len(frames) == 40
    rgb, flow = frames[10]["rgb"], frames[10]["flow"]
    assert rgb.shape == (64, 64, 3) and rgb.dtype == np.uint8
    assert flow.shape == (64, 64, 2) and flow.dtype == np.float32
    assert np.abs(flow).max() <= 1.0
    # The disc moves 2 px per source frame to the right (1.5 px after the 72/80 resize): its flow x is positive.
    moving = np.abs(flow[..., 0]) > 0.5 * np.abs(flow[..., 0]).max()
    assert flow[..., 0][moving].mean() > 0
    np.testing.assert_array_equal(frames[-1]["flow"], frames[-2]["flow"])  # the last frame repeats the last field


def test_tvl1_sees_a_known_shift():
    rng = np.random.default_rng(0)
    image = (rng.uniform(0, 255, (64, 64))).astype(np.uint8)
    import cv2

    image = cv2.GaussianBlur(image, (7, 7), 2)
    shifted = np.roll(image, 3, axis=1)  # everything moves 3 px to the right
    flow = TVL1()(image, shifted)
    inner = flow[16:-16, 16:-16]
    assert abs(float(np.median(inner[..., 0])) - 3.0) < 0.3 and abs(float(np.median(inner[..., 1]))) < 0.3


# ---------------------------------------------------------------------------------------------------
# cltdr extract


def test_extract_writes_the_feature_grid(videos, weights, tmp_path, capsys):
    out = tmp_path / "features"
    code, stdout, stderr = run(
        ["extract", videos["long"], videos["short"], "--out", out, *_weight_args(weights), *SMALL], capsys
    )
    assert code == 0, stderr
    assert "clips/s" in stderr and "ETA" in stderr
    index = json.loads((out / "videos.json").read_text())
    for vid, frames in (("shapes_long", 40), ("shapes_short", 33)):  # 27 frames at 25 fps -> 1.08 s at 30 fps
        info = index["videos"][vid]
        assert info["frames"] == frames and info["fps"] == 30.0
        assert info["T"] == num_windows(frames, 16, 4) == (frames - 16) // 4 + 1
        assert abs(info["duration"] - frames / 30) < 1e-9
        feats = np.load(out / f"{vid}.npy")
        assert feats.shape == (info["T"], 2048) and feats.dtype == np.float32
        assert np.isfinite(feats).all() and feats[:, :1024].std() > 0 and feats[:, 1024:].std() > 0
        assert f"{vid}.npy [{info['T']}, 2048]" in stdout
    assert index["protocol"]["window"] == 16 and index["protocol"]["protocol"]["size"] == 64


def test_one_compilation_per_batch_shape_and_batching_does_not_change_rows(videos, weights, tmp_path):
    protocol = FrameProtocol(resize=72, size=64)
    rows = {}
    for batch_size in (3, 8):
        options = ExtractOptions(protocol, window=16, stride=4, streams=("rgb",), batch_size=batch_size)
        network = I3DFeatures(weights, options)
        infos = extract_videos([videos["long"], videos["short"]], tmp_path / str(batch_size), network)
        assert network.compilations() == 1  # videos of 7 and 5 rows, partial batches padded: one shape
        assert [info["T"] for info in infos.values()] == [7, 5]
        rows[batch_size] = np.load(tmp_path / str(batch_size) / "shapes_long.npy")
    np.testing.assert_allclose(rows[3], rows[8], rtol=1e-5, atol=1e-5)


def test_i3d_programs_get_our_compiler_options(weights, monkeypatch):
    """As the detector's: compiled without YNNPACK fusions on the CPU (XLA's defaults make two at this size)."""
    import jax
    import jax.numpy as jnp

    from cltdr_jax import xla_options

    if jax.default_backend() != "cpu":
        pytest.skip("the option is for the CPU backend")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(xla_options.DEFAULTS_ENV, raising=False)
    options = ExtractOptions(FrameProtocol(resize=72, size=64), window=16, stride=4, streams=("rgb",))
    network = I3DFeatures(weights, options)
    x = jax.ShapeDtypeStruct((1, 16, 64, 64, 3), jnp.uint8)
    text = network._fns["rgb"].lower(network.variables["rgb"], x).compile().as_text()
    assert "fusion" in text and "__ynn_fusion" not in text


def test_network_from_weights_in_memory_equals_the_one_from_files(weights):
    """I3DFeatures.from_variables (the benchmark's) builds what the file constructor builds: same features."""
    options = ExtractOptions(FrameProtocol(resize=72, size=64), window=16, stride=4, streams=("rgb", "flow"))
    from_files = I3DFeatures(weights, options)
    in_memory = {s: i3d_params_from_torch(dict(np.load(weights[s]))) for s in options.streams}
    from_variables = I3DFeatures.from_variables(in_memory, options)
    rng = np.random.default_rng(0)
    batch = {
        "rgb": rng.integers(0, 256, (2, 16, 64, 64, 3), np.uint8),
        "flow": rng.uniform(-1, 1, (2, 16, 64, 64, 2)).astype(np.float32),
    }
    expected = np.asarray(from_files(batch))
    assert expected.shape == (2, 2048) and expected.std() > 0
    np.testing.assert_array_equal(np.asarray(from_variables(batch)), expected)


def test_extract_one_stream_and_bfloat16(videos, weights, tmp_path, capsys):
    out = tmp_path / "flow_only"
    code, _, stderr = run(
        ["extract", videos["short"], "--out", out, "--streams", "flow", "--flow-weights", weights["flow"]]
        + [*SMALL, "--stride", "8", "--dtype", "bfloat16", "--flow-resize", "36"],
        capsys,
    )
    assert code == 0, stderr
    feats = np.load(out / "shapes_short.npy")
    assert feats.shape == ((33 - 16) // 8 + 1, 1024) and np.isfinite(feats).all()


# ---------------------------------------------------------------------------------------------------
# Bad input: one line naming the file, exit status 2


def test_not_a_video(weights, tmp_path, capsys):
    path = tmp_path / "notes.mp4"
    path.write_text("these are my holiday notes, not a video\n" * 10)
    code, _, err = run(["extract", path, "--out", tmp_path / "o", *_weight_args(weights), *SMALL], capsys)
    assert code == 2
    assert err.startswith("cltdr extract: error: ") and f"{path}: not a video file" in err


def test_video_without_decodable_frames(videos, weights, tmp_path, capsys):
    path = tmp_path / "garbled.mkv"
    source = av.open(str(videos["long"]))
    target = av.open(str(path), "w")
    stream = target.add_stream_from_template(source.streams.video[0])
    for packet in source.demux(source.streams.video[0]):
        if packet.size:  # the same packets, timestamps and sizes, with their bytes zeroed
            garbage = av.Packet(bytes(packet.size))
            garbage.pts, garbage.dts, garbage.time_base, garbage.stream = (
                packet.pts,
                packet.dts,
                packet.time_base,
                stream,
            )
            target.mux(garbage)
    target.close()
    source.close()
    code, _, err = run(["extract", path, "--out", tmp_path / "o", *_weight_args(weights), *SMALL], capsys)
    assert code == 2 and f"{path}: no decodable video frames" in err


def test_fewer_frames_than_one_window(weights, tmp_path, capsys):
    path = write_video(tmp_path / "blink.mp4", 10)
    code, _, err = run(["extract", path, "--out", tmp_path / "o", *_weight_args(weights), *SMALL], capsys)
    assert code == 2 and f"{path}: 10 frames at 30 fps" in err and "fewer than one window of 16 frames" in err


def test_weights_of_the_wrong_stream(videos, weights, tmp_path, capsys):
    args = ["extract", videos["short"], "--out", tmp_path / "o", *SMALL]
    code, _, err = run([*args, "--rgb-weights", weights["flow"], "--flow-weights", weights["rgb"]], capsys)
    assert code == 2
    assert f"{weights['flow']}: these are flow I3D weights" in err and "swapped" in err


def test_weights_of_another_network(videos, tmp_path, capsys):
    other = tmp_path / "resnet.npz"
    np.savez(other, **{"conv1.weight": np.zeros((64, 3, 7, 7), np.float32), "fc.bias": np.zeros(10, np.float32)})
    code, _, err = run(["extract", videos["short"], "--out", tmp_path / "o", "--streams", "rgb"], capsys)
    assert code == 2 and "needs --rgb-weights" in err
    code, _, err = run(
        ["extract", videos["short"], "--out", tmp_path / "o", "--streams", "rgb", "--rgb-weights", other], capsys
    )
    assert code == 2 and f"{other}: not the weights of the I3D port" in err


# ---------------------------------------------------------------------------------------------------
# cltdr detect


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> tuple[Path, list[str]]:
    """A seeded, untrained CLTDR-GMG on 2048-d I3D features (the THUMOS config, shrunk)."""
    import jax
    import jax.numpy as jnp

    from cltdr_jax.checkpoint import save_params
    from cltdr_jax.config import load_config
    from cltdr_jax.model.detector import CLTDRGMG

    overrides = [*TINY_OVERRIDES, "dataset.json_file=null"]
    cfg = load_config(REPO / "configs" / "thumos_i3d.yaml", overrides)
    t = cfg.dataset.max_seq_len
    model = CLTDRGMG(cfg.model, cfg.train_cfg)
    feats, mask = jnp.zeros((1, t, cfg.dataset.input_dim)), jnp.ones((1, t), bool)
    params = jax.jit(model.init)(jax.random.key(7), feats, mask)["params"]
    folder = tmp_path_factory.mktemp("detector") / "ckpt"
    save_params(folder, params, {"config": cfg.to_dict(), "source": "seeded test weights"})
    return folder, overrides


@pytest.mark.slow
def test_detect_from_video_to_picture(videos, weights, tiny_checkpoint, tmp_path, capsys):
    ckpt, overrides = tiny_checkpoint
    sets = [a for o in overrides for a in ("--set", o)]
    out, plots, keep = tmp_path / "detections.json", tmp_path / "plots", tmp_path / "feats"
    code, stdout, stderr = run(
        ["detect", REPO / "configs" / "thumos_i3d.yaml", ckpt, videos["long"], videos["short"], *sets]
        + ["--out", out, "--plot", plots, "--features-out", keep, *_weight_args(weights), *SMALL],
        capsys,
    )
    assert code == 0, stderr
    dets = json.loads(out.read_text())
    assert set(dets) == {"version", "external_data", "results"}
    assert set(dets["results"]) == {"shapes_long", "shapes_short"}
    durations = {"shapes_long": 40 / 30, "shapes_short": 33 / 30}
    for vid, rows in dets["results"].items():
        assert rows, vid
        scores = [r["score"] for r in rows]
        assert scores == sorted(scores, reverse=True)
        for r in rows:
            assert set(r) == {"segment", "label", "label_id", "score"}
            assert 0.0 <= r["segment"][0] <= r["segment"][1] <= durations[vid] + 1e-6
            assert 0 <= r["label_id"] < 20
        assert (plots / f"{vid}.png").stat().st_size > 1000
        assert (keep / f"{vid}.npy").is_file()
    assert "detections" in stdout


def test_detect_refuses_a_grid_the_model_was_not_trained_on(videos, weights, tiny_checkpoint, tmp_path, capsys):
    ckpt, overrides = tiny_checkpoint
    sets = [a for o in overrides for a in ("--set", o)]
    base = ["detect", REPO / "configs" / "thumos_i3d.yaml", ckpt, videos["short"], *sets, "--out", tmp_path / "d"]
    code, _, err = run([*base, *_weight_args(weights), "--stride", "8"], capsys)
    assert code == 2 and "--stride 8 but the model's dataset.feat_stride is 4" in err
    code, _, err = run([*base, "--streams", "rgb", "--rgb-weights", weights["rgb"]], capsys)
    assert code == 2 and "gives 1024-d features but the model takes dataset.input_dim = 2048" in err


def test_detect_takes_the_checkpoint_step_and_weights(videos, weights, tiny_checkpoint, tmp_path, capsys):
    """--step / --weights reach the checkpoint loader, which refuses before any video is decoded."""
    ckpt, overrides = tiny_checkpoint
    sets = [a for o in overrides for a in ("--set", o)]
    base = ["detect", REPO / "configs" / "thumos_i3d.yaml", ckpt, videos["short"], *sets, "--out", tmp_path / "d.json"]
    code, _, err = run([*base, *_weight_args(weights), "--step", "99"], capsys)
    assert code == 2 and "99" in err and not (tmp_path / "d.json").exists()
    code, _, err = run([*base, *_weight_args(weights), "--weights", "raw"], capsys)
    assert code == 2 and "raw" in err and not (tmp_path / "d.json").exists()
