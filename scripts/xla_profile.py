"""Where a compiled JAX program spends its time, by operation kind, read from XLA's own profile.

    breakdown = op_breakdown(compiled, lambda: run_once(), repeats=2)

Runs the program under `jax.profiler` and sums the device time of every HLO instruction the trace reports
(`hlo_op`), then classifies each instruction of the compiled module:

  * kind: `conv/dot` (a convolution or dot inside), `fft`, `reduction` (reduce / reduce-window: the
    norms, softmax, pooling, losses), `copy/transpose` (copies, transposes, pads, slices, concatenates,
    gathers without arithmetic), `elementwise` (the rest);
  * pass: `backward` when the metadata's op name is inside JAX's `transpose(...)` (the VJP), else `forward`
    (the optimizer and EMA count as forward: they follow the backward pass in the same program).

Used by scripts/benchmark_train.py (`--profile`). An instruction's time runs from its start to its end,
also where the CPU runtime finishes it asynchronously on its thread pool (an "end: <instruction>" event;
counting the launch alone left about a fifth of the demo's step unattributed). Times are summed over the
instructions, so concurrent instructions (GPU streams, CPU thread pools running several thunks) can add
up to more than the wall time.
"""

from __future__ import annotations

import bisect
import collections
import glob
import gzip
import json
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*([^=]*?)\s([\w\-]+)\((.*)$")
_COMPUTATION = re.compile(r"^%?([\w.\-]+)\s.*\{\s*$")
_CALLS = re.compile(r"calls=%?([\w.\-]+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')

_HEAVY = {"convolution": "conv/dot", "dot": "conv/dot", "fft": "fft"}
_REDUCE = {"reduce", "reduce-window", "select-and-scatter", "sort"}
_MOVES = {
    "copy", "transpose", "pad", "slice", "dynamic-slice", "dynamic-update-slice", "concatenate", "gather",
    "scatter", "broadcast", "reshape", "bitcast", "parameter", "constant", "tuple", "get-tuple-element", "iota",
    "copy-start", "copy-done", "reverse",
}  # fmt: skip


def _parse(hlo_text: str) -> tuple[dict[str, list[tuple[str, str, str, str]]], dict[str, str]]:
    """computation -> [(instruction, opcode, rest of line, result shape)], and instruction -> its computation."""
    computations: dict[str, list[tuple[str, str, str, str]]] = collections.defaultdict(list)
    where: dict[str, str] = {}
    current = None
    for line in hlo_text.splitlines():
        if not line.startswith(" ") and line.rstrip().endswith("{"):
            m = _COMPUTATION.match(line.replace("ENTRY ", ""))
            current = m.group(1) if m else None
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            computations[current].append((m.group(1), m.group(3), m.group(4), m.group(2)))
            where[m.group(1)] = current
    return computations, where


def _opcodes(computations, name: str, seen: set[str] | None = None) -> list[str]:
    """Every opcode inside computation `name`, following fusions and calls."""
    seen = seen if seen is not None else set()
    if name in seen:
        return []
    seen.add(name)
    out = []
    for _, opcode, rest, _ in computations.get(name, []):
        out.append(opcode)
        for called in _CALLS.findall(rest):
            out += _opcodes(computations, called, seen)
    return out


_WRAPPER = re.compile(r"^(?:jit|pjit|jvp|transpose|vmap|checkpoint|remat)\((.*)\)$")
_NOT_A_PART = ("main", "CLTDRGMG", "checkpoint", "rematted_computation", "while", "body", "cond")


def scope(op_name: str, depth: int = 2) -> str:
    """The model part an instruction comes from: the first `depth` module names of its op_name metadata,
    without JAX's jit / jvp / transpose / remat wrappers, each name once ("jit(step)/transpose(jvp(CLTDRGMG))/
    backbone/stem_0/..." -> "backbone/stem_0"); the optimizer, the losses and the decoder come out under
    their own names. Also used by scripts/xla_memory.py."""
    parts = []
    for part in op_name.split("/"):
        if part.startswith(("jit(", "pjit(")):  # the jitted function's own name
            continue
        while (m := _WRAPPER.match(part)) is not None:
            part = m.group(1)
        if part and not part.startswith(_NOT_A_PART) and part not in parts:
            parts.append(part)
    return "/".join(parts[:depth]) or "(top level)"


def classify(hlo_text: str, depth: int = 2) -> dict[str, tuple[str, str, str, str]]:
    """instruction name -> (kind, pass, scope, result shape) for every instruction of a compiled module's
    text."""
    computations, _ = _parse(hlo_text)
    out = {}
    for instructions in computations.values():
        for name, opcode, rest, shape in instructions:
            inner = [opcode]
            for called in _CALLS.findall(rest):
                inner += _opcodes(computations, called)
            kinds = {_HEAVY[o] for o in inner if o in _HEAVY}
            if "conv/dot" in kinds:
                kind = "conv/dot"
            elif kinds:
                kind = kinds.pop()
            elif any(o in _REDUCE for o in inner):
                kind = "reduction"
            elif all(o in _MOVES or o == "fusion" for o in inner):
                kind = "copy/transpose"
            else:
                kind = "elementwise"
            op_name = _OP_NAME.search(rest)
            backward = bool(op_name and "transpose(" in op_name.group(1))
            where = scope(op_name.group(1), depth) if op_name else "?"
            out[name] = (kind, "backward" if backward else "forward", where, shape)
    return out


def _union(intervals: list[tuple[float, float]]) -> float:
    """Total length covered by [start, end) intervals."""
    covered, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            covered += end - max(start, reach)
            reach = end
    return covered


def op_breakdown(
    compiled: Any, run: Callable[[], Any], repeats: int = 2, top: int = 25, depth: int = 2
) -> dict[str, Any]:
    """Seconds per (kind, pass) for one call of `run` (which calls `compiled` once), averaged over repeats,
    the `top` (model part, kind) pairs by time (a part: `depth` module names) and the `top` instructions."""
    kinds = classify(compiled.as_text(), depth)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp)
        wall = time.perf_counter()
        for _ in range(repeats):
            jax.block_until_ready(run())
        wall = time.perf_counter() - wall
        jax.profiler.stop_trace()
        files = glob.glob(f"{tmp}/**/*.trace.json.gz", recursive=True)
        events = json.load(gzip.open(files[-1]))["traceEvents"] if files else []
    totals: dict[str, float] = collections.Counter()
    by_scope: dict[str, float] = collections.Counter()
    by_instruction: dict[str, float] = collections.Counter()
    unmatched = 0.0
    intervals = []
    # XLA's CPU runtime runs dots, reductions and some fusions asynchronously on its thread pool: the
    # instruction's event covers only its launch, an "end: <instruction>" event marks its completion.
    ends: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        if e.get("ph") == "X" and e.get("name", "").startswith("end: "):
            ends[e["name"][5:]].append(e["ts"])
    for times in ends.values():
        times.sort()
    for e in events:
        op = (e.get("args") or {}).get("hlo_op")
        if e.get("ph") != "X" or not op:
            continue
        start = e.get("ts", 0)
        end = start + e.get("dur", 0)
        later = ends.get(op, [])
        i = bisect.bisect_left(later, start)
        if i < len(later):
            end = max(end, later[i])
        intervals.append((start, end))
        seconds = (end - start) / 1e6 / repeats
        if op in kinds:
            kind, direction, where, _ = kinds[op]
            totals[f"{direction}/{kind}"] += seconds
            by_scope[f"{where} [{kind}]"] += seconds
            by_instruction[op] += seconds
        else:
            unmatched += seconds
    total = sum(totals.values())
    return {
        "seconds": {k: round(v, 4) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])},
        "fraction": {k: round(v / total, 3) for k, v in sorted(totals.items(), key=lambda kv: -kv[1])} if total else {},
        # The model parts and op kinds that cost most (forward and backward together): where to look next.
        "top_scopes_s": {k: round(v, 4) for k, v in by_scope.most_common(top)},
        # The single instructions that cost most: "name kind pass scope shape" -> seconds.
        "top_instructions_s": {" ".join((op, *kinds[op])): round(v, 4) for op, v in by_instruction.most_common(top)},
        "instructions_total_s": round(total, 4),
        # Per call: instructions run, the time at least one runs (their union: against the total it shows
        # how much runs side by side), and the call's wall time under the profiler; wall - busy is the
        # time no instruction runs (the runtime's own work, the host's dispatch).
        "instructions_per_call": round(len(intervals) / repeats),
        "busy_s": round(_union(intervals) / 1e6 / repeats, 4),
        "wall_s": round(wall / repeats, 4),
        "unclassified_s": round(unmatched, 4),
    }
