#!/usr/bin/env python
"""What is alive at the peak of a compiled program's working memory, from XLA's own buffer assignment.

    XLA_FLAGS="--xla_dump_to=/tmp/dump --xla_dump_hlo_module_re=.*train_step.*" \
        python scripts/benchmark_train.py --steps 1 --variant float32 [--set trainer.remat=[gmg,heads]]
    python scripts/xla_memory.py /tmp/dump [--top 25]

Reads the dump's `*-buffer-assignment.txt` (the size of every value in the temporary arena), `*-live-range.txt`
(the instruction interval over which each value is alive, in the schedule XLA chose) and the optimized HLO
(each instruction's op_name), replays the schedule, and prints one JSON object: the arena's size, the peak
of the live bytes and where in the schedule it falls, and the live bytes at the peak grouped by model part
(the op_name without JAX's wrappers, `--depth` names deep). This is how we found that rematerialisation does
not lower the CPU step's peak: XLA schedules the recomputed activations of all heads together.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import re

from xla_profile import scope

_VALUE = re.compile(r"<\d+ (\S+) @\d+> \(size=(\d+),offset=(\d+)\)")
_RANGE = re.compile(r"\s+(\S+?)\{[^}]*\}:(\d+)-(\d+)")
_OP_NAME = re.compile(r"%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"")


def analyse(dump: str, module: str = "train_step", depth: int = 3, top: int = 25) -> dict:
    prefix = glob.glob(f"{dump}/*{module}*after_optimizations-buffer-assignment.txt")[0].removesuffix(
        "-buffer-assignment.txt"
    )
    slices, arena, in_temp = {}, 0, False  # value -> (offset, size) in the temporary arena
    for line in open(f"{prefix}-buffer-assignment.txt"):
        if line.startswith("allocation"):
            in_temp = "preallocated-temp" in line
            if in_temp:
                arena = int(line.split("size ")[1].split(",")[0])
        elif in_temp and (m := _VALUE.search(line)):
            slices[m.group(1)] = (int(m.group(3)), int(m.group(2)))
    ranges = []
    for line in open(f"{prefix}-live-range.txt").read().split("BufferLiveRange:")[1].splitlines():
        if (m := _RANGE.match(line)) and m.group(1) in slices:
            ranges.append((m.group(1), int(m.group(2)), int(m.group(3))))
    # Replay: values that share a slice (in-place outputs, aliases) count once while any of them is alive.
    events = sorted([(start, 0, name) for name, start, _ in ranges] + [(end + 1, -1, name) for name, _, end in ranges])
    holders: dict[tuple[int, int], int] = collections.Counter()
    live, peak, at = 0, 0, 0
    for t, kind, name in events:  # at equal times the ends (-1) come first
        key = slices[name]
        if kind < 0:
            holders[key] -= 1
            live -= key[1] if holders[key] == 0 else 0
        else:
            live += key[1] if holders[key] == 0 else 0
            holders[key] += 1
            if live > peak:
                peak, at = live, t
    length = max(end for _, _, end in ranges) + 1
    op_names = dict(_OP_NAME.findall(open(f"{prefix}.txt").read()))
    by_part: dict[str, int] = collections.Counter()
    counted = set()
    for name, start, end in ranges:
        if start <= at <= end and slices[name] not in counted:
            counted.add(slices[name])
            by_part[scope(op_names.get(name, ""), depth)] += slices[name][1]
    return {
        "temp_arena_gb": round(arena / 2**30, 3),
        "peak_live_gb": round(peak / 2**30, 3),
        "peak_at_fraction_of_schedule": round(at / length, 3),
        "live_at_peak_gb_by_part": {k: round(v / 2**30, 3) for k, v in by_part.most_common(top)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dump", help="the --xla_dump_to directory")
    parser.add_argument("--module", default="train_step", help="part of the dumped module's name")
    parser.add_argument("--depth", type=int, default=3)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    print(json.dumps(analyse(args.dump, args.module, args.depth, args.top), indent=1))


if __name__ == "__main__":
    main()
