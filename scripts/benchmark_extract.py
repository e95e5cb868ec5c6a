"""Time I3D feature extraction on this machine: the network per stream and dtype, and TV-L1; prints one JSON.

    python scripts/benchmark_extract.py                 # the protocol's clips (16 x 224 x 224), a few minutes
    python scripts/benchmark_extract.py --batch 2 --repeats 1 --flow-pairs 4 --out bench.json

How each figure is measured:
  * `clips_per_s[stream][dtype]`: `cltdr extract`'s compiled network (`I3DFeatures`) on a batch of
    `--batch` random clips [B, 16, 224, 224, C] (C = 3 RGB as uint8, 2 flow as float32) with seeded random
    weights in the port's layout (speed does not depend on the values); one call first to compile
    (`compile_s`, not counted), then `--repeats` timed calls, each waited for with `block_until_ready`;
    clips/s = B x repeats / time.
    float32 runs at Precision.HIGHEST, bfloat16 at the default precision (the `--dtype` choices of `extract`).
  * `tvl1_frames_per_s`: OpenCV's `DualTVL1OpticalFlow` (default parameters, as `extract` uses it) on
    `--flow-pairs` pairs of 224 x 224 grayscale frames (smoothed noise shifted by 2 px, so the solver works
    as on real motion): `one_thread` runs the pairs one after another on one solver; `pool` runs them on
    a pool of CPU-count threads with one solver each, as `extract` does. Frames/s = pairs / time. At the
    protocol's flow resolution (shorter side 256, e.g. 256 x 341 for 4:3 video) expect about 0.6 x these.
  * Figures on shared machines move between runs; `load_average` records the 1-minute load at the start.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import time

from machine import machine


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4, help="clips per network call")
    parser.add_argument("--repeats", type=int, default=2, help="timed network calls per stream and dtype")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--window", type=int, default=16)
    parser.add_argument("--flow-pairs", type=int, default=8, help="frame pairs timed for TV-L1")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--out", default=None, help="also write the JSON here")
    return parser.parse_args()


def time_network(stream: str, dtype: str, args: argparse.Namespace) -> dict:
    import jax.numpy as jnp
    import numpy as np

    from cltdr_jax.video.extract import ExtractOptions, I3DFeatures
    from cltdr_jax.video.i3d import STREAM_CHANNELS, i3d_params_from_torch, random_torch_weights

    channels = STREAM_CHANNELS[stream]
    variables = i3d_params_from_torch(random_torch_weights(channels, seed=channels))
    # `cltdr extract`'s own network: its dtype / precision rule, compiler options and input scaling.
    network = I3DFeatures.from_variables({stream: variables}, ExtractOptions(streams=(stream,), dtype=dtype))
    rng = np.random.default_rng(0)
    shape = (args.batch, args.window, args.size, args.size, channels)
    # What extract feeds each stream: RGB frames as uint8 (scaled on the device), flow as float32 in [-1, 1].
    x = rng.integers(0, 256, shape, np.uint8) if stream == "rgb" else rng.uniform(-1, 1, shape).astype(np.float32)
    batch = {stream: jnp.asarray(x)}
    t0 = time.perf_counter()
    network(batch).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.repeats):
        network(batch).block_until_ready()
    elapsed = time.perf_counter() - t0
    return {
        "clips_per_s": round(args.batch * args.repeats / elapsed, 3),
        "seconds_per_batch": round(elapsed / args.repeats, 3),
        "compile_s": round(compile_s, 2),
    }


def time_tvl1(args: argparse.Namespace) -> dict:
    import cv2
    import numpy as np

    from cltdr_jax.video.frames import TVL1

    rng = np.random.default_rng(0)
    pairs = []
    for _ in range(args.flow_pairs):
        image = cv2.GaussianBlur(rng.uniform(0, 255, (args.size, args.size)).astype(np.uint8), (7, 7), 2)
        pairs.append((image, np.roll(image, 2, axis=1)))
    tvl1 = TVL1()
    tvl1(*pairs[0])  # creates the solver
    t0 = time.perf_counter()
    for pair in pairs:
        tvl1(*pair)
    one = args.flow_pairs / (time.perf_counter() - t0)
    workers = os.cpu_count() or 1
    pooled = TVL1()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda p: pooled(*p), pairs[:workers]))  # one solver per thread, created outside the timing
        t0 = time.perf_counter()
        list(pool.map(lambda p: pooled(*p), pairs))
        many = args.flow_pairs / (time.perf_counter() - t0)
    return {"one_thread": round(one, 2), "pool": round(many, 2), "pool_threads": workers, "size": args.size}


def main() -> None:
    args = parse_args()
    import jax

    result = {
        "machine": machine(),
        "load_average": round(os.getloadavg()[0], 2),
        "jax": jax.__version__,
        "device": str(jax.devices()[0]),
        "batch_shape": {
            stream: [args.batch, args.window, args.size, args.size, c] for stream, c in (("rgb", 3), ("flow", 2))
        },
        "clips_per_s": {},
    }
    for stream in ("rgb", "flow"):
        result["clips_per_s"][stream] = {d: time_network(stream, d, args) for d in args.dtypes.split(",")}
    result["tvl1_frames_per_s"] = time_tvl1(args)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
