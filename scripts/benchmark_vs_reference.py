#!/usr/bin/env python
"""Speed and memory of cltdr-jax against the authors' PyTorch code, measured side by side in one run.

    python scripts/benchmark_vs_reference.py [--rounds 2] [--parts train,infer,demo] [--out bench.json]
    python scripts/benchmark_vs_reference.py --parts train --set trainer.remat=[gmg]   # our step with overrides

Needs the reference harness set up (../shared/tools/reference/setup.sh: REF_DIR, REF_PY or their defaults).
Every measurement is its own process, and reference and ours alternate, round after round, so that a
change in the machine's speed during the run hits both; the report gives each figure per round and the
ratios of the medians. Run it on an otherwise idle machine. Parts:

  * roofs: float32 matmul and bfloat16 dot (float32 accumulation) rates of `jnp.dot` 2048^3, in this run;
  * train: THUMOS I3D config, batch 2 x 2304 x 2048: the reference's step (`ref_bench.py --what train`)
    and ours in float32 and bfloat16 compute (`benchmark_train.py`, with the step time by operation kind
    from XLA's profile, peak RSS and XLA's memory analysis);
  * infer: one video of T = 2304: the reference's network (`ref_bench.py --what infer`) and ours in float32
    and bfloat16 (`benchmark_inference.py`: pad, run, read back);
  * demo: the demo's small config (64 channels, batch 4, T = 512) on the same `cltdr synth` data, for
    `--demo-epochs` epochs: the reference's training loop (`ref_train_synth.py`, its epochs' time) against
    `cltdr train` (its steps' time from log.jsonl, the first, compiling step left out), and our compiled step
    alone on the same batch shapes, timed in the same process right before and after training (the loop's
    overhead: against the mean of the two).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from machine import machine

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO.parent / "shared" / "tools" / "reference"
CONFIG = REPO / "configs" / "thumos_i3d_focalloss.yaml"


def run_json(cmd: list[str], env: dict | None = None) -> dict:
    """Runs a command that prints one JSON object (the last lines of stdout), and returns it."""
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode not in (0, 3):  # ref_bench exits 3 when contention kept it from finishing cleanly
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    text = out.stdout.strip()
    return json.loads(text[text.index("{") :])


def roofs() -> dict:
    """The float32 and bfloat16 matmul roofs of this run (machine.matmul_roof_gflops), in a child process."""
    code = (
        f"import json,sys; sys.path.insert(0,{str(Path(__file__).parent)!r}); from machine import matmul_roof_gflops\n"
        "f,b=matmul_roof_gflops('float32'),matmul_roof_gflops('bfloat16')\n"
        "print(json.dumps({'float32_matmul_gflops': f['gflops'], 'bfloat16_dot_gflops': b['gflops'],"
        " 'float32_dots_gflops': f['all_gflops'], 'bfloat16_dots_gflops': b['all_gflops']}))\n"
    )
    return run_json([sys.executable, "-c", code])


def ref_python() -> str:
    root = Path(os.environ.get("REF_ROOT", Path(os.environ.get("TMPDIR", "/tmp")) / "cltdr-reference"))
    return os.environ.get("REF_PY", str(root / "venv" / "bin" / "python"))


def train_round(steps: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ref = run_json([ref_python(), str(TOOLS / "ref_bench.py"), "--what", "train", "--iters", str(steps),
                        "--warmup", "1", "--out", f"{tmp}/ref.json"])  # fmt: skip
    ours = run_json([sys.executable, str(REPO / "scripts" / "benchmark_train.py"), "--config", str(CONFIG),
                     "--steps", str(steps), "--variants", "float32,bfloat16", "--profile",
                     *(a for o in overrides for a in ("--set", o))])  # fmt: skip
    return {"reference": ref, "ours": ours["results"]}


def infer_round(repeats: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        ref = run_json([ref_python(), str(TOOLS / "ref_bench.py"), "--what", "infer", "--T", "2304",
                        "--iters", str(repeats), "--out", f"{tmp}/ref.json"])  # fmt: skip
    ours = {}
    for dtype in ("float32", "bfloat16"):
        script = str(REPO / "scripts" / "benchmark_inference.py")
        cmd = [sys.executable, script, "--config", str(CONFIG), "--lengths", "2304", "--repeats", str(repeats)]
        ours[dtype] = run_json([*cmd, "--dtype", dtype])
    return {"reference": ref, "ours": ours}


def demo_round(data: Path, epochs: int, workdir: Path) -> dict:
    sys.path.insert(0, str(REPO))
    from cltdr_jax.demo import DEMO_OVERRIDES

    settings = [*DEMO_OVERRIDES, "opt.warmup_epochs=2", f"opt.epochs={epochs - 2}", "init_rand_seed=0"]
    ref_dir = workdir / f"ref_{time.time_ns()}"
    ref = run_json([ref_python(), str(TOOLS / "ref_train_synth.py"), "--data", str(data), "--seed", "0",
                    "--workdir", str(ref_dir), "--demo-py", str(REPO / "cltdr_jax" / "demo.py"),
                    "--warmup-epochs", "2", "--epochs", str(epochs - 2)])  # fmt: skip
    ours = run_json([sys.executable, __file__, "--demo-child", str(data / "config.yaml"),
                     str(workdir / f"ours_{time.time_ns()}"), *settings])  # fmt: skip
    steps, loop_s, alone = ours["steps"], ours["loop_s_without_first_step"], ours["compiled_step_alone"]
    ours_step = loop_s / (steps - 1)
    alone_s = (alone["before"]["step_s_median"] + alone["after"]["step_s_median"]) / 2
    return {
        "reference": {"steps": ref["steps"], "train_s": ref["train_s"], "steps_per_s": ref["steps"] / ref["train_s"]},
        "ours": {
            "steps": steps,
            "loop_s_without_first_step": round(loop_s, 2),
            "steps_per_s": round(1 / ours_step, 3),
            "wall_s_with_compile_and_evaluation": ours["wall_s"],
            # Timed before and after training: the machine's speed drifts over the loop's minute.
            "compiled_step_alone_s": round(alone_s, 4),
            "compiled_step_alone_before_after_s": [alone["before"]["step_s_median"], alone["after"]["step_s_median"]],
            "compiled_step_alone_segment_slots": alone["after"]["segment_slots"],
            "loop_overhead": round(ours_step / alone_s - 1, 3),
        },
    }


def demo_child(config: str, workdir: str, settings: list[str]) -> None:
    """`cltdr train`'s body (train_and_evaluate), and its compiled step alone on batches of the same shapes
    before and after it, in this one process: the loop's overhead measured without a second process's
    different state, and against the step's time on both sides of the loop (this machine's speed drifts)."""
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, str(REPO / "scripts"))
    from benchmark_train import run_variant

    from cltdr_jax.config import load_config
    from cltdr_jax.data.datasets import VideoDataset
    from cltdr_jax.input_pipeline import segment_slots
    from cltdr_jax.train import train_and_evaluate

    cfg = load_config(config, settings)
    # The same batch shapes as the loop's, ground-truth slots included (they size the target assignment).
    slots = segment_slots(VideoDataset(cfg, cfg.train_split, training=True))
    before = run_variant(config, "float32", 30, tuple(settings), slots=slots)
    t0 = time.perf_counter()
    train_and_evaluate(cfg, workdir)
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in (Path(workdir) / "log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "final_loss" in r]
    loop_s = round(sum(r["step_time"] for r in steps[1:]), 2)
    after = run_variant(config, "float32", 30, tuple(settings), slots=slots)
    print(json.dumps({"steps": len(steps), "loop_s_without_first_step": loop_s, "wall_s": round(wall, 1),
                      "compiled_step_alone": {"before": before, "after": after}}))  # fmt: skip


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--parts", default="train,infer,demo")
    parser.add_argument("--steps", type=int, default=3, help="measured train steps per process")
    parser.add_argument("--demo-epochs", type=int, default=10)
    parser.add_argument("--set", action="append", default=[], help="config override for our train step (train part)")
    parser.add_argument("--out")
    parser.add_argument("--demo-child", nargs="+", help=argparse.SUPPRESS)  # CONFIG WORKDIR SETTING...
    args = parser.parse_args()
    if args.demo_child:
        demo_child(args.demo_child[0], args.demo_child[1], args.demo_child[2:])
        return
    parts = args.parts.split(",")
    report: dict = {
        "benchmark": "cltdr-jax vs the reference (authors' PyTorch code), side by side in one run",
        **machine(),
        "our_train_overrides": args.set,
        "rounds": [],
    }
    data = None
    with tempfile.TemporaryDirectory() as tmp:
        if "demo" in parts:
            sys.path.insert(0, str(REPO))
            from cltdr_jax.synth import synthesize

            data = Path(tmp) / "synth160_s0"
            synthesize("thumos14", data, feature_dim=64, num_videos=160, seed=0, max_duration=60.0)
        for r in range(args.rounds):
            one: dict = {"roofs": roofs()}
            if "train" in parts:
                one["train"] = train_round(args.steps, args.set)
            if "infer" in parts:
                one["infer"] = infer_round(5)
            if "demo" in parts:
                one["demo"] = demo_round(data, args.demo_epochs, Path(tmp))
            report["rounds"].append(one)
            print(f"round {r + 1} done", file=sys.stderr, flush=True)

    rounds = report["rounds"]
    summary: dict = {
        "float32_matmul_gflops": median([x["roofs"]["float32_matmul_gflops"] for x in rounds]),
        "bfloat16_dot_gflops": median([x["roofs"]["bfloat16_dot_gflops"] for x in rounds]),
    }
    if "train" in parts:
        ref = median([x["train"]["reference"]["median"]["total_s"] for x in rounds])
        for i, dtype in enumerate(("float32", "bfloat16")):
            ours = [x["train"]["ours"][i] for x in rounds]
            step = median([o["step_s_median"] for o in ours])
            gflops = ours[0]["xla_gflop_per_step"] / step
            roof = summary["float32_matmul_gflops" if dtype == "float32" else "bfloat16_dot_gflops"]
            summary[f"train_{dtype}"] = {
                "ours_step_s": step,
                "reference_step_s": ref,
                "speedup": round(ref / step, 2),
                "achieved_gflops": round(gflops, 1),
                "fraction_of_roof": round(gflops / roof, 3),
                "peak_rss_gb": max(o["peak_rss_gb"] for o in ours),
                "xla_temp_gb": ours[0]["xla_temp_gb"],
            }
        summary["reference_train_peak_rss_gb"] = round(
            max(x["train"]["reference"]["peak_rss_mb"] for x in rounds) / 1024, 2
        )
    if "infer" in parts:
        ref = median([x["infer"]["reference"]["median"]["network_s"] for x in rounds])
        for dtype in ("float32", "bfloat16"):
            ours = [x["infer"]["ours"][dtype]["lengths"]["2304"] for x in rounds]
            net = median([o["network_s"] for o in ours])
            roof = summary["float32_matmul_gflops" if dtype == "float32" else "bfloat16_dot_gflops"]
            summary[f"infer_{dtype}_T2304"] = {
                "ours_network_s": net,
                "reference_network_s": ref,
                "speedup": round(ref / net, 2),
                "fraction_of_roof": round(ours[0]["gflop"] / net / roof, 3),
            }
    if "demo" in parts:
        ref = median([x["demo"]["reference"]["steps_per_s"] for x in rounds])
        ours = median([x["demo"]["ours"]["steps_per_s"] for x in rounds])
        summary["demo_training_loop"] = {
            "ours_steps_per_s": ours,
            "reference_steps_per_s": round(ref, 3),
            "speedup": round(ours / ref, 2),
            "loop_overhead": median([x["demo"]["ours"]["loop_overhead"] for x in rounds]),
        }
    report["summary"] = summary
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
