"""Checks a `cltdr export-torch` checkpoint in the authors' own code: runs their unmodified eval.py on it and
compares its detections with ours (`cltdr predict` of the same model).

    cltdr export-torch CONFIG CHECKPOINT W/export.pth.tar
    cltdr predict CONFIG CHECKPOINT --out W/ours.json
    python scripts/check_export_reference.py CONFIG W/export.pth.tar W/ours.json [--out report.json]

Run it from the directory CONFIG's relative paths start from, with the reference set up by
`../shared/tools/reference/setup.sh` (it re-executes itself with that venv's python, $REF_PY; the tools
directory is $REF_TOOLS, default ../shared/tools/reference beside this checkout). CONFIG must be in the
reference's schema (every config of configs/ and the fixtures is).

eval.py runs as the authors wrote it (`python eval.py CONFIG CKPT --saveonly`, through runpy), with the
run-time workarounds of the reference tools: `torch.load` gets map_location="cpu" (eval.py maps storages
to CUDA; torch 2.13's default weights_only=True is kept, so the file is read by torch's safe loader), the
mmengine stand-in, a no-op torch.cuda.synchronize. The detections it saves are matched one to one with
ours (same label, boundaries within --seg-tol s, score within --score-tol), and both sets are scored by the
reference's own ANETdetection.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import runpy
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("REF_TOOLS", str(REPO.parent / "shared" / "tools" / "reference")))
import refenv  # noqa: E402  (the reference tools: finds the checkout and its venv, applies the workarounds)


def run_eval(config: str, ckpt: Path) -> dict:
    """eval.py on `ckpt` with --saveonly; returns the arrays valid_one_epoch saved."""
    import torch

    load = torch.load
    torch.load = lambda f, *a, **k: load(f, *a, **{**k, "map_location": "cpu"})
    out = ckpt.parent / "eval_results.pkl"  # where eval.py --saveonly writes
    out.unlink(missing_ok=True)
    argv = sys.argv
    sys.argv = ["eval.py", config, str(ckpt), "--saveonly"]
    try:
        runpy.run_path(os.path.join(refenv.ref_dir(), "eval.py"), run_name="__main__")
    finally:
        sys.argv, torch.load = argv, load
    with open(out, "rb") as f:
        return pickle.load(f)


def match(ours: list[dict], theirs: list[tuple], seg_tol: float, score_tol: float) -> int:
    """Greedy one-to-one matching of our detections (JSON rows) with theirs ((start, end, label, score))."""
    import numpy as np

    if not theirs:
        return 0
    segs = np.array([(s, e) for s, e, _, _ in theirs])
    labels = np.array([lab for _, _, lab, _ in theirs])
    scores = np.array([sc for _, _, _, sc in theirs])
    used = np.zeros(len(theirs), bool)
    n = 0
    for row in ours:
        close = (np.abs(segs - np.array(row["segment"])).max(axis=1) <= seg_tol) & (
            np.abs(scores - row["score"]) <= score_tol
        )
        hit = np.nonzero(~used & (labels == row["label_id"]) & close)[0]
        if len(hit):
            used[hit[0]] = True
            n += 1
    return n


def main() -> int:
    refenv.reexec_under_ref_py()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", help="the config, in the reference's schema")
    parser.add_argument("checkpoint", help="the .pth.tar `cltdr export-torch` wrote")
    parser.add_argument("ours", help="our detections of the same model (`cltdr predict ... --out`)")
    parser.add_argument("--seg-tol", type=float, default=1e-3, help="seconds (default 1e-3)")
    parser.add_argument("--score-tol", type=float, default=1e-4, help="default 1e-4")
    parser.add_argument("--out", default=None, help="write the report JSON here")
    args = parser.parse_args()
    info = refenv.prepare()

    import numpy as np
    from libs.core import load_config
    from libs.utils import ANETdetection

    saved = run_eval(args.config, Path(args.checkpoint).absolute())
    theirs: dict[str, list[tuple]] = {}
    for vid, s, e, lab, sc in zip(
        saved["video-id"], saved["t-start"], saved["t-end"], saved["label"], saved["score"], strict=True
    ):
        theirs.setdefault(vid, []).append((float(s), float(e), int(lab), float(sc)))
    ours = json.loads(Path(args.ours).read_text())["results"]

    videos = sorted(set(ours) | set(theirs))
    per_video = {
        vid: {
            "ours": len(ours.get(vid, [])),
            "reference": len(theirs.get(vid, [])),
            "matched": match(ours.get(vid, []), theirs.get(vid, []), args.seg_tol, args.score_tol),
        }
        for vid in videos
    }

    cfg = load_config(args.config)
    ours_arrays = {"video-id": [], "t-start": [], "t-end": [], "label": [], "score": []}
    for vid, rows in ours.items():
        for r in rows:
            ours_arrays["video-id"].append(vid)
            ours_arrays["t-start"].append(r["segment"][0])
            ours_arrays["t-end"].append(r["segment"][1])
            ours_arrays["label"].append(r["label_id"])
            ours_arrays["score"].append(r["score"])
    ours_arrays = {k: np.asarray(v) for k, v in ours_arrays.items()}
    tious = np.linspace(0.3, 0.7, 5) if cfg["dataset_name"].startswith("thumos") else np.linspace(0.5, 0.95, 10)
    maps = {}
    for name, results in (("reference", saved), ("ours", ours_arrays)):
        evaluator = ANETdetection(cfg["dataset"]["json_file"], cfg["val_split"][0], tiou_thresholds=tious)
        m, avg = evaluator.evaluate(results, verbose=False)
        maps[name] = {"mAP": [float(x) for x in m], "average_mAP": float(avg)}

    total = sum(v["reference"] for v in per_video.values())
    matched = sum(v["matched"] for v in per_video.values())
    counts_equal = all(v["ours"] == v["reference"] for v in per_video.values())
    report = {
        "checkpoint": str(args.checkpoint),
        "videos": len(videos),
        "detections_reference": total,
        "detections_ours": sum(v["ours"] for v in per_video.values()),
        "matched": matched,
        "counts_equal": counts_equal,
        "tolerances": {"segment_s": args.seg_tol, "score": args.score_tol},
        "mAP": maps,
        "mAP_equal": maps["reference"] == maps["ours"],
        "per_video": per_video,
        "torch": info.get("torch"),
        "workarounds": info.get("workarounds", []) + ["torch.load: map_location='cpu' (eval.py maps to CUDA)"],
    }
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    ok = counts_equal and matched == total and report["mAP_equal"]
    print(f"{'OK' if ok else 'MISMATCH'}: {matched} of {total} detections matched", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
