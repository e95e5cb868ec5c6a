"""The profiling scripts' readings: model parts from op names (hand-written cases) and the live-memory replay
of XLA's buffer assignment on a program whose peak is known, and the resident memory `memory_stages.py` reads."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"
sys.path.insert(0, str(SCRIPTS))

import memory_stages  # noqa: E402
import xla_memory  # noqa: E402
import xla_profile  # noqa: E402


@pytest.mark.parametrize(
    ("op_name", "depth", "expected"),
    [
        ("jit(train_step)/jit(main)/transpose(jvp(CLTDRGMG))/backbone/stem_0/ln/div", 2, "backbone/stem_0"),
        ("jit(train_step)/jvp(CLTDRGMG)/trident/start_head/trunk/head_1/conv", 3, "trident/start_head/trunk"),
        ("jit(train_step)/losses/trident_decode/jit(_where)/select_n", 2, "losses/trident_decode"),
        ("jit(train_step)/add", 2, "add"),
    ],
)
def test_profile_scope_strips_jax_wrappers(op_name, depth, expected):
    assert xla_profile.scope(op_name, depth) == expected


def test_scope_skips_remat_wrappers_and_repeated_names():
    name = "jit(train_step)/transpose(jvp(CLTDRGMG))/checkpoint/rematted_computation/cls_head/trunk/norm_0/div"
    assert xla_profile.scope(name, 3) == "cls_head/trunk/norm_0"
    assert xla_profile.scope("jit(train_step)/jvp(CLTDRGMG)/backbone/CLTDRGMG/backbone/stem_0/ln", 2) == (
        "backbone/stem_0"
    )


def test_memory_replay_sees_two_matrices_alive_together(tmp_path):
    """a = x @ w1 and b = x @ w2 (4 MiB each) are both needed by a.T @ b: the replayed peak holds both."""
    program = textwrap.dedent(
        """
        import jax, jax.numpy as jnp
        def step(x, w1, w2):
            a = jnp.sin(x @ w1)
            b = jnp.cos(x @ w2)
            return a.T @ b
        x = jnp.ones((1024, 1024)); w = jnp.ones((1024, 1024))
        jax.jit(step).lower(x, w, w).compile()
        """
    )
    env = {**os.environ, "XLA_FLAGS": f"--xla_dump_to={tmp_path} --xla_dump_hlo_module_re=.*step.*"}
    subprocess.run([sys.executable, "-c", program], env=env, check=True, capture_output=True)
    report = xla_memory.analyse(str(tmp_path), module="step")
    two_matrices = 2 * 1024 * 1024 * 4 / 2**30
    assert report["peak_live_gb"] >= two_matrices - 1e-3
    assert report["peak_live_gb"] <= report["temp_arena_gb"] + 1e-3


def test_memory_stages_sees_an_allocation():
    """64 MiB written through numpy show up in the process's anonymous resident size and in malloc's count."""
    import numpy as np

    before = memory_stages._resident()
    block = np.ones(64 * 2**20 // 8)
    after = memory_stages._resident()
    assert 0.055 < after["RssAnon"] - before["RssAnon"] < 0.075, (before, after)
    if before["malloc_in_use"] is not None:  # glibc 2.33+
        assert 0.055 < after["malloc_in_use"] - before["malloc_in_use"] < 0.075, (before, after)
    del block
