"""Pictures: detections against GT on a timeline, per-class AP and mAP-vs-tIoU charts, training curves.

matplotlib is optional (``pip install cltdr-jax[plot]``) and imported only inside the functions. Figures are
drawn on an Agg canvas of their own, without pyplot, so no global backend state is touched and nothing
needs a display.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cltdr_jax import evaluation
from cltdr_jax.data.annotations import label_vocabulary, parse_segment, read_json
from cltdr_jax.errors import CltdrError, DataError


class PlotDependencyError(CltdrError, ImportError):
    """matplotlib is not installed."""


def _new_figure(width: float, height: float) -> Any:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotDependencyError(
            "plotting needs matplotlib, which is not installed: pip install cltdr-jax[plot]"
        ) from None
    fig = Figure(figsize=(width, height))
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, out_path: str | Path) -> Path:
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def _label_text(label: Any, class_names: Mapping[int, str] | Sequence[str] | None) -> str:
    if isinstance(label, str):
        return label
    if isinstance(class_names, Mapping) and int(label) in class_names:
        return class_names[int(label)]
    if isinstance(class_names, Sequence) and 0 <= int(label) < len(class_names):
        return class_names[int(label)]
    return str(label)


# ---------------------------------------------------------------------------------------------------------
# Timeline of one video
# ---------------------------------------------------------------------------------------------------------


def plot_timeline(
    detections_for_video: Sequence[Mapping[str, Any]],
    gt_for_video: Sequence[Mapping[str, Any]],
    class_names: Mapping[int, str] | Sequence[str] | None,
    duration: float | None,
    out_path: str | Path,
    top: int = 10,
) -> Path:
    """Draws one video's detections against its GT and writes a PNG.

    Args:
      detections_for_video: ``[{"segment": [s, e], "label": name or label_id, "score": x}]``.
      gt_for_video: ``[{"segment": [s, e], "label": name or label_id}]``; empty for detections only.
      class_names: label_id -> name (mapping or list) for integer labels; None keeps ids as text.
      duration: video length in seconds (x range); None: the last segment end.
      top: detections drawn per class, highest scores first.
    Returns:
      the written path.

    One row per class present in the GT or among the ``top`` best detections of the video. GT instances are
    solid bars on the upper half of a row; the detections of that class lie below, one thin lane each, with
    opacity proportional to the score and the score written beside them.
    """
    gts = [(_label_text(g["label"], class_names), *map(float, g["segment"])) for g in gt_for_video]
    dets = [
        (
            _label_text(d["label"], class_names),
            float(d["segment"][0]),
            float(d["segment"][1]),
            float(d["score"]),
        )
        for d in detections_for_video
    ]
    dets.sort(key=lambda d: -d[3])
    rows = list(dict.fromkeys([g[0] for g in gts] + [d[0] for d in dets[:top]]))
    ends = [g[2] for g in gts] + [d[2] for d in dets]
    x_max = float(duration) if duration else max(ends + [1.0])

    fig = _new_figure(12, 1.0 + 0.9 * max(len(rows), 1))
    ax = fig.add_subplot(1, 1, 1)
    colors = [f"C{i % 10}" for i in range(len(rows))]
    for r, (name, color) in enumerate(zip(rows, colors, strict=True)):
        y0 = len(rows) - 1 - r  # first row at the top
        for label, s, e in gts:
            if label == name:
                ax.broken_barh([(s, e - s)], (y0 + 0.5, 0.4), facecolors=color, edgecolor="black", linewidth=0.6)
        mine = [d for d in dets if d[0] == name][:top]
        lane = 0.45 / max(len(mine), 1)
        for i, (_, s, e, score) in enumerate(mine):
            y = y0 + 0.45 - (i + 1) * lane
            alpha = 0.15 + 0.8 * min(max(score, 0.0), 1.0)
            ax.broken_barh([(s, e - s)], (y, lane * 0.85), facecolors=color, alpha=alpha)
            ax.text(max(e, s), y + lane * 0.4, f"{score:.2f}", fontsize=6, va="center", ha="left")
    ax.set_yticks([len(rows) - 1 - r + 0.5 for r in range(len(rows))])
    ax.set_yticklabels(rows)
    ax.set_ylim(0, max(len(rows), 1))
    ax.set_xlim(0, x_max)
    ax.set_xlabel("time (s)")
    if gts:
        ax.set_title(f"GT (solid, upper half) and top-{top} detections per class (lower half, opacity = score)")
    else:  # `cltdr detect` on a user's video: no ground truth to draw
        ax.set_title(f"top-{top} detections per class (opacity = score)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return _save(fig, out_path)


def plot_video(detections: str | Path, gt: str | Path, video: str, out_path: str | Path, top: int = 10) -> Path:
    """Timeline of one video of a detections file against its ground truth (`cltdr plot`); returns the PNG."""
    preds = evaluation.load_predictions(detections)
    if video not in set(preds.video_id):
        raise DataError(
            f"{detections}: video {video!r} has no detections in this file ({len(set(preds.video_id))} videos present)"
        )
    data, src = read_json(gt, "ground truth")
    db = data.get("database")
    if not isinstance(db, Mapping):
        raise DataError(f"{src}: no 'database' object; expected ActivityNet ground truth")
    if video not in db:
        raise DataError(f"{src}: video {video!r} is not in the ground truth ({len(db)} videos present)")
    entry = db[video]
    anns = entry.get("annotations", []) if isinstance(entry, Mapping) else None
    if not isinstance(anns, list):
        raise DataError(f"{src}: video {video!r}: 'annotations' must be a list")
    gt_rows = []
    for i, ann in enumerate(anns):
        where = f"{src}: video {video!r}, annotation {i}"
        if not isinstance(ann, Mapping) or "label" not in ann:
            raise DataError(f"{where}: expected an object with 'segment' and 'label'")
        gt_rows.append({"segment": parse_segment(ann.get("segment"), where), "label": ann["label"]})
    names_by_id, _ = label_vocabulary(data, src)

    sel = np.nonzero(preds.video_id == video)[0]
    dets = [
        {
            "segment": [preds.t_start[i], preds.t_end[i]],
            "label": preds.label_name[i] if preds.label_name[i] is not None else int(preds.label_id[i]),
            "score": preds.score[i],
        }
        for i in sel
    ]
    duration = entry.get("duration")
    duration = float(duration) if isinstance(duration, (int, float)) and duration > 0 else None
    return plot_timeline(dets, gt_rows, names_by_id, duration, out_path, top=top)


# ---------------------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------------------


def plot_ap(metrics: Mapping[str, Any], out_dir: str | Path) -> list[Path]:
    """Per-class AP (mean over thresholds) bar chart and mAP-vs-tIoU line chart of ``evaluate``'s output.

    Returns the written paths: ``out_dir/per_class_ap.png``, ``out_dir/map_vs_tiou.png``.
    """
    out_dir = Path(out_dir)
    per_class = {name: float(np.mean(ap)) for name, ap in metrics["per_class_AP"].items()}
    names = sorted(per_class, key=lambda n: -per_class[n])
    values = [100 * per_class[n] for n in names]

    fig = _new_figure(8, max(3.0, 1.2 + 0.22 * len(names)))
    ax = fig.add_subplot(1, 1, 1)
    y = np.arange(len(names))[::-1]
    ax.barh(y, values, color="C0")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=7)
    ax.set_xlim(0, 100)
    ax.set_xlabel("AP (%), mean over tIoU thresholds")
    ax.axvline(
        100 * metrics["average_mAP"],
        color="C3",
        linestyle="--",
        label=f"mAP {100 * metrics['average_mAP']:.2f}",
    )
    ax.legend(loc="lower right")
    ax.set_title("per-class AP")
    fig.tight_layout()
    paths = [_save(fig, out_dir / "per_class_ap.png")]

    fig = _new_figure(6, 4)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(metrics["tiou_thresholds"], [100 * v for v in metrics["mAP"]], marker="o", color="C0")
    ax.axhline(
        100 * metrics["average_mAP"],
        color="C3",
        linestyle="--",
        label=f"Avg. {100 * metrics['average_mAP']:.2f}",
    )
    ax.set_xlabel("tIoU threshold")
    ax.set_ylabel("mAP (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("mAP vs tIoU")
    fig.tight_layout()
    paths.append(_save(fig, out_dir / "map_vs_tiou.png"))
    return paths


# ---------------------------------------------------------------------------------------------------------
# Training log
# ---------------------------------------------------------------------------------------------------------


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per non-empty line; DataError naming the file and line otherwise."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the training log: {e}") from None
    records = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}:{n}: expected a JSON object per line, got {type(rec).__name__}")
        records.append(rec)
    return records


def _series(records: list[dict], x_key: str, y_key: str, positive: bool = False) -> tuple[list, list]:
    xs, ys = [], []
    for r in records:
        x, y = r.get(x_key), r.get(y_key)
        if isinstance(x, (int, float)) and isinstance(y, (int, float)) and math.isfinite(y):
            if positive and y <= 0:
                continue  # log axis
            xs.append(x)
            ys.append(y)
    return xs, ys


def plot_training_curves(jsonl_path: str | Path, out_path: str | Path) -> Path:
    """Losses (log y), learning rate, gradient norm and validation mAP from a JSONL training log.

    Training lines carry ``step`` and some of ``loss``, ``cls_loss``, ``reg_loss``, ``lr``, ``grad_norm``;
    evaluation lines carry ``epoch`` (or ``step``) and ``average_mAP``. Returns the written path.
    """
    records = read_jsonl(jsonl_path)
    fig = _new_figure(11, 7)
    axes = [fig.add_subplot(2, 2, i) for i in range(1, 5)]

    def finish(ax: Any, drawn: bool, title: str, xlabel: str) -> None:
        if not drawn:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="gray")
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)

    ax = axes[0]
    drawn = False
    for key in ("loss", "cls_loss", "reg_loss"):
        xs, ys = _series(records, "step", key, positive=True)
        if xs:
            ax.plot(xs, ys, label=key, linewidth=1)
            drawn = True
    if drawn:
        ax.set_yscale("log")
        ax.legend()
    finish(ax, drawn, "losses", "step")

    for ax, key, log in ((axes[1], "lr", False), (axes[2], "grad_norm", True)):
        xs, ys = _series(records, "step", key, positive=log)
        if xs:
            ax.plot(xs, ys, linewidth=1, color="C2" if key == "lr" else "C4")
            if log:
                ax.set_yscale("log")
        finish(ax, bool(xs), key, "step")

    ax = axes[3]
    xs, ys = _series(records, "epoch", "average_mAP")
    x_label = "epoch"
    if not xs:
        xs, ys = _series(records, "step", "average_mAP")
        x_label = "step"
    if xs:
        ax.plot(xs, [100 * y for y in ys], marker="o", color="C3")
        ax.set_ylabel("average mAP (%)")
    finish(ax, bool(xs), "validation mAP", x_label)

    fig.tight_layout()
    return _save(fig, out_path)
