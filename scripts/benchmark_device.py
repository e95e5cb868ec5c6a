#!/usr/bin/env python
"""One benchmark of the whole job on whatever device JAX sees (GPU, TPU or CPU); prints one JSON object.

    python scripts/benchmark_device.py            # THUMOS I3D config, full size (made for one H100 / H200)
    python scripts/benchmark_device.py --small    # the same measures, smaller (a CPU run in a few minutes)

Measures, each its own process where peak memory matters:
  * train step, batch 2 x 2304 x 2048, for float32 at `highest` precision, the training default
    (`trainer.precision: default`: TF32-class convolutions on a GPU) and bfloat16 compute (float32 state):
    median step time after compilation, XLA's FLOPs per step, peak device memory (`memory_stats`); and
    the training default again with `trainer.remat: [gmg]` (what recomputing the GMG blocks costs there);
    and bfloat16 with the convolutions in their other form (`CLTDR_CONV_FORMS`: on a GPU the CPU's
    rewritten forms, on a CPU XLA's own convolution), to show which is faster there;
  * inference of one video at T = 2304 and 4608 (`Predictor.network`: pad, run, read back), float32 at
    `highest` (the prediction default) and bfloat16;
  * a whole split end to end: 200 videos with THUMOS14-like lengths (durations drawn by `cltdr synth`'s
    profile, random features made in memory, no file I/O), `predict_items` with its default batch size:
    videos/s including candidate selection and Soft-NMS on the host;
  * the reference (the authors' PyTorch code) on the same card, when torch with CUDA and a checkout are
    present (`REF_DIR`, as set up by ../shared/tools/reference/setup.sh): the same train step and inference,
    timed the way `ref_bench.py` times them on a CPU.
Random weights: speed does not depend on their values (the post-processing of a split somewhat does).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import machine

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "thumos_i3d_focalloss.yaml"


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def random_params(cfg, seed: int = 0):
    import jax
    import jax.numpy as jnp

    from cltdr_jax.inference import inference_model

    t = cfg.dataset.max_seq_len
    init = jax.jit(inference_model(cfg).init)
    x, mask = jnp.zeros((1, t, cfg.dataset.input_dim)), jnp.ones((1, t), bool)
    return init(jax.random.key(seed), x, mask)["params"]


def inference(config: str, lengths: list[int], repeats: int) -> dict:
    import numpy as np

    from cltdr_jax.config import load_config
    from cltdr_jax.inference import Predictor

    out = {}
    for dtype in ("float32", "bfloat16"):
        # bfloat16 at the default precision: "highest" would ask for float32-exact products of bfloat16 inputs.
        precision = "highest" if dtype == "float32" else "default"
        cfg = load_config(config, [f"inference.dtype={dtype}", f"inference.precision={precision}"])
        predictor = Predictor(cfg, random_params(cfg), batch_size=1)
        rng = np.random.default_rng(1)
        for length in lengths:
            feats = rng.standard_normal((length, cfg.dataset.input_dim)).astype(np.float32)
            t0 = time.perf_counter()
            predictor.network(feats)  # compiles
            compile_s = time.perf_counter() - t0
            out[f"{dtype}_T{length}"] = {
                "precision": cfg.inference.precision,
                "first_call_s": round(compile_s, 2),
                "network_s": round(median_time(lambda f=feats, p=predictor: p.network(f), repeats), 4),
            }
    return out


def split(config: str, videos: int, max_duration: float | None) -> dict:
    import tempfile

    import numpy as np

    from cltdr_jax.config import load_config
    from cltdr_jax.data.datasets import video_item
    from cltdr_jax.inference import Predictor, predict_items
    from cltdr_jax.synth import synthesize

    cfg = load_config(config)
    with tempfile.TemporaryDirectory() as tmp:
        synthesize("thumos14", tmp, feature_dim=8, num_videos=videos, seed=0, features=False, max_duration=max_duration)
        database = json.loads((Path(tmp) / "annotations.json").read_text())["database"]
    d = cfg.dataset
    rng = np.random.default_rng(2)
    lengths = {
        vid: max(1, int((e["duration"] * e["fps"] - d.num_frames) // d.feat_stride) + 1) for vid, e in database.items()
    }
    feats = {vid: rng.standard_normal((t, d.input_dim)).astype(np.float32) for vid, t in lengths.items()}
    predictor = Predictor(cfg, random_params(cfg))

    def items():
        for vid, e in database.items():
            yield video_item(cfg, vid, feats[vid], e["fps"], e["duration"])

    predict_items(predictor, items())  # compiles every padded length
    t0 = time.perf_counter()
    _, stats = predict_items(predictor, items())
    seconds = time.perf_counter() - t0
    return {
        "videos": len(database),
        "feature_steps": {"min": min(lengths.values()), "max": max(lengths.values()), "total": sum(lengths.values())},
        "batch_size": stats["batch_size"],
        "padded_lengths": len(stats["padded_lengths"]),
        "seconds": round(seconds, 2),
        "videos_per_s": round(len(database) / seconds, 2),
        "host_postprocess_s": round(stats["postprocess_seconds"], 2),
    }


def reference_cuda(config_rel: str, lengths: list[int], repeats: int) -> dict:
    """The authors' model on the GPU, when torch with CUDA and the reference checkout are there."""
    ref_dir = os.environ.get("REF_DIR")
    try:
        import torch
    except ImportError:
        return {"skipped": "torch is not installed"}
    if not torch.cuda.is_available() or not ref_dir or not Path(ref_dir).is_dir():
        return {"skipped": "needs torch with CUDA and REF_DIR (a checkout of the reference)"}
    sys.path[:0] = [ref_dir, str(Path(ref_dir) / "libs" / "utils")]
    tools = REPO.parent / "shared" / "tools" / "reference"
    if tools.is_dir():
        sys.path.insert(0, str(tools))
        import refenv  # the harness's run-time workarounds (mmengine stand-in, ...)

        refenv.prepare()
    import numpy as np
    from libs.core import load_config
    from libs.modeling import make_meta_arch
    from libs.utils import ModelEma, make_optimizer, make_scheduler

    cfg = load_config(str(Path(ref_dir) / config_rel))
    d, c = cfg["dataset"], cfg["model"]["num_classes"]
    model = torch.nn.DataParallel(make_meta_arch(cfg["model_name"], **cfg["model"]).cuda(), device_ids=["cuda:0"])

    def video(i, t, rng, train):
        lengths = rng.uniform(8, min(200, t / 2), 8)
        starts = rng.uniform(0, t - lengths)
        return {
            "video_id": f"bench{i}", "feats": torch.from_numpy(rng.standard_normal((d["input_dim"], t), np.float32)),
            "segments": torch.from_numpy(np.stack([starts, starts + lengths], 1).astype(np.float32)) if train else None,
            "labels": torch.from_numpy(rng.integers(0, c, 8)) if train else None, "fps": 30.0,
            "duration": (t * d["feat_stride"] + d["num_frames"]) / 30.0, "feat_stride": d["feat_stride"],
            "feat_num_frames": d["num_frames"],
        }  # fmt: skip

    def timed(fn) -> float:
        fn()
        torch.cuda.synchronize()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return statistics.median(times)

    rng = np.random.default_rng(0)
    out = {"torch": torch.__version__, "tf32_conv": torch.backends.cudnn.allow_tf32}
    model.eval()
    for t in lengths:
        v = video(0, t, rng, False)
        with torch.no_grad():
            out[f"infer_T{t}_s"] = round(timed(lambda v=v: model([v])), 4)  # network + decode + NMS, as eval.py
    model.train()
    optimizer = make_optimizer(model, cfg["opt"])
    scheduler = make_scheduler(optimizer, cfg["opt"], 100)
    ema = ModelEma(model)
    batch = [video(i, cfg["model"]["max_seq_len"], rng, True) for i in range(2)]

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model(batch)["final_loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["train_cfg"]["clip_grad_l2norm"])
        optimizer.step()
        scheduler.step()
        ema.update(model)

    torch.cuda.reset_peak_memory_stats()
    out["train_step_s"] = round(timed(train_step), 4)
    out["train_peak_device_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="fewer repeats and videos, shorter lengths (CPU)")
    parser.add_argument("--config", default=str(CONFIG))
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    import jax

    small = args.small
    lengths = [2304, 2560] if small else [2304, 4608]  # two padded lengths either way
    repeats = 2 if small else 10
    report = {
        "benchmark": "cltdr-jax on one device, THUMOS I3D config, random weights",
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "jax": jax.__version__,
        "machine": machine(),
        "small": small,
    }
    t0 = time.perf_counter()
    train_cmd = [sys.executable, str(REPO / "scripts" / "benchmark_train.py"), "--config", args.config]
    train_cmd += ["--steps", str(1 if small else 10)]

    def train(*options: str, env: dict[str, str] | None = None) -> list[dict]:
        done = subprocess.run(
            [*train_cmd, *options], capture_output=True, text=True, check=True, env={**os.environ, **(env or {})}
        )
        return json.loads(done.stdout)["results"]

    report["train"] = train("--variants", "float32:highest,float32:default,bfloat16:default")
    # What recomputing the GMG blocks (trainer.remat) costs and saves on this device: the training default's
    # step with it (the CPU: +2-4 % time, XLA's temporaries 1.17 -> 0.81 GB; README, Memory).
    report["train_remat_gmg"] = train("--variants", "float32:default", "--set", "trainer.remat=[gmg]")
    # bfloat16 with the convolutions in their other form (layers.rewritten_conv_forms): on a GPU the CPU's
    # (one matmul per kernel tap), on a CPU XLA's own convolution: which is faster on this device. (In
    # float32 at the THUMOS config the forms differ only in the heads' thin last layers.)
    other = "xla" if jax.default_backend() == "cpu" else "rewritten"
    report["train_other_conv_forms"] = {
        "CLTDR_CONV_FORMS": other,
        "results": train("--variants", "bfloat16:default", env={"CLTDR_CONV_FORMS": other}),
    }
    report["inference"] = inference(args.config, lengths, repeats)
    report["split"] = split(args.config, 12 if small else 200, 60.0 if small else None)
    report["reference"] = reference_cuda("configs/thumos_i3d_focalloss.yaml", lengths, repeats)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
