"""Time inference at the THUMOS I3D config (21.9 M parameters); prints one JSON object.

    python scripts/benchmark_inference.py                       # T = 2304 and 4608, about a minute
    python scripts/benchmark_inference.py --lengths 2304 --repeats 3 --threads 1

Random weights (seeded) and random features [T, 2048]. Per length it reports the lowering + XLA compile
time of the network (one executable per padded length, as `cltdr predict` builds them), the median time
of `Predictor.network` (pad, run, transfer: what the reference's network time measures) and of the
bare executable, the FLOPs of the executable from XLA's `cost_analysis()` and the achieved FLOP/s as a
fraction of a float32 2048^3 `jnp.dot` timed in the same run, and the post-processing time (candidates +
Soft-NMS). Random weights do not give a trained model's scores (the refined logit is a product of two
random logits: most scores are near 1, every level fills its 2,000 candidates, classes are very
unequal), so the post-processing time is indicative only; when the golden fixture
(../shared/fixtures/thumos_small) is present, Soft-NMS is also timed on the reference's own candidates there.
Peak memory is the process's peak RSS. Timings on shared machines move between runs: compare figures from
one run only.
"""

from __future__ import annotations

import argparse
import os
import sys


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/thumos_i3d.yaml")
    parser.add_argument("--lengths", default="2304,4608", help="comma-separated video lengths (steps)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median reported)")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="run on this many CPUs (the process's CPU affinity is set before JAX starts; default: all)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="inference.dtype")
    return parser.parse_args()


ARGS = parse_args()
if ARGS.threads:
    # XLA sizes its thread pools from the CPUs this process may run on, so this must precede `import jax`.
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: ARGS.threads])

import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from machine import machine, matmul_roof_gflops  # noqa: E402

from cltdr_jax.config import load_config  # noqa: E402
from cltdr_jax.convert import count_params  # noqa: E402
from cltdr_jax.inference import Predictor, pad_features  # noqa: E402
from cltdr_jax.model.detector import CLTDRGMG  # noqa: E402
from cltdr_jax.postprocess import Detections, level_candidates, soft_nms, video_detections  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "thumos_small"


def median_time(fn, repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def flops_of(compiled: jax.stages.Compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0]
    return float(cost.get("flops", float("nan")))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def time_fixture_nms(cfg, repeats: int) -> dict | None:
    """Soft-NMS on the largest video of the golden fixture: the reference's 6,830 candidates (5 classes)."""
    path = FIXTURE / "reference_outputs.npz"
    if not path.is_file():
        return None
    ref = np.load(path)
    vid = str(ref["test/video_ids"][-1])
    candidates = Detections(*(ref[f"test/{vid}/cand_{k}"] for k in ("segments", "scores", "labels")))

    def run():
        return soft_nms(candidates, cfg.test_cfg)

    run()
    seconds, _ = median_time(run, repeats)
    return {
        "video": vid,
        "candidates": len(candidates),
        "classes": int(len(np.unique(candidates.labels))),
        "detections": len(run()),
        "soft_nms_s": seconds,
    }


def time_length(predictor: Predictor, feats: np.ndarray, repeats: int, roof_gflops: float) -> dict:
    """Compile, network, executable and post-processing times of one video of features [T, D_in]."""
    cfg, length = predictor.cfg, len(feats)
    padded = cfg.padded_length(length)
    exe = predictor.executable(padded)
    compile_s = predictor.compile_seconds[padded]
    predictor.network(feats)  # warm-up
    network_s, network_all = median_time(lambda: predictor.network(feats), repeats)
    x, mask = pad_features(feats, padded)
    exec_s, _ = median_time(lambda: jax.block_until_ready(exe(predictor.params, x, mask)), repeats)
    flops = flops_of(exe)

    levels = predictor.network(feats)
    dets = video_detections(levels, cfg.test_cfg)
    post_s, _ = median_time(lambda: video_detections(levels, cfg.test_cfg), repeats)
    candidates = sum(len(level_candidates(s, left, right, cfg.test_cfg)) for s, left, right in levels)
    return {
        "padded_len": padded,
        "compile_s": round(compile_s, 3),
        "network_s": round(network_s, 4),
        "network_s_runs": [round(v, 4) for v in network_all],
        "executable_s": round(exec_s, 4),
        "gflop": round(flops / 1e9, 2),
        "achieved_gflops": round(flops / exec_s / 1e9, 1),
        "fraction_of_matmul_roof": round(flops / exec_s / 1e9 / roof_gflops, 3),
        "postprocess_s": round(post_s, 4),
        "candidates": candidates,
        "detections": len(dets),
        "peak_rss_mb_so_far": round(peak_rss_mb(), 1),
    }


def main() -> None:
    args = ARGS
    # bfloat16 at the default precision: "highest" would ask for float32-exact products of bfloat16 inputs.
    precision = "highest" if args.dtype == "float32" else "default"
    cfg = load_config(
        args.config, [f"inference.dtype={args.dtype}", f"inference.precision={precision}", *args.overrides]
    )
    lengths = [int(v) for v in args.lengths.split(",")]
    rng = np.random.default_rng(args.seed)

    start = time.perf_counter()
    model = CLTDRGMG(cfg.model, cfg.train_cfg)
    init_len = cfg.dataset.max_seq_len
    params = jax.jit(model.init)(
        jax.random.PRNGKey(args.seed),
        jnp.zeros((1, init_len, cfg.dataset.input_dim), jnp.float32),
        jnp.ones((1, init_len), bool),
    )["params"]
    params = jax.block_until_ready(params)
    init_s = time.perf_counter() - start
    predictor = Predictor(cfg, params)

    # The roof of the network's dtype: bfloat16 is measured against the bfloat16 dot, not the float32 one.
    roof = matmul_roof_gflops(cfg.inference.dtype)
    results = {}
    for length in lengths:
        feats = rng.standard_normal((length, cfg.dataset.input_dim)).astype(np.float32)
        results[str(length)] = time_length(predictor, feats, args.repeats, roof["gflops"])

    out = {
        "benchmark": "inference, random weights and features, batch 1",
        "config": args.config,
        "dtype": cfg.inference.dtype,
        "precision": cfg.inference.precision,
        "params": count_params(params),
        "init_s": round(init_s, 2),
        "machine": {
            **machine(),
            "jax": jax.__version__,
            "backend": jax.default_backend(),
            "python": sys.version.split()[0],
        },
        "matmul_roof_gflops": roof,  # jnp.dot 2048^3 in the network's dtype (machine.matmul_roof_gflops)
        "lengths": results,
        "soft_nms_fixture": time_fixture_nms(cfg, args.repeats),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "notes": [
            "network_s: Predictor.network (pad, run, device_get); executable_s: the compiled call alone",
            "postprocess_s: candidates + Soft-NMS of random-weight scores (untrained): see soft_nms_fixture",
            "compile_s: jit lowering + XLA compile of one padded length (no persistent cache)",
            "the reference beside it: scripts/benchmark_vs_reference.py (side by side in one run)",
        ],
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
