"""Our compiler options reach the programs we compile, and a user can still choose XLA's own."""

from __future__ import annotations

import jax.numpy as jnp
import pytest

from cltdr_jax import xla_options
from cltdr_jax.config import load_config
from cltdr_jax.convert import convert_checkpoint
from cltdr_jax.inference import Predictor

YNN = "xla_cpu_experimental_ynn_fusion_type"


def test_cpu_options_and_the_ways_to_keep_xla_defaults(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(xla_options.DEFAULTS_ENV, raising=False)
    assert xla_options.compiler_options("cpu") == {YNN: ""}
    assert xla_options.compiler_options("cpu", "float32") == {YNN: ""}
    # bfloat16 keeps YNNPACK's dots: XLA's own converts bfloat16 operands to float32
    dots = {YNN: "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
    assert xla_options.compiler_options("cpu", "bfloat16") == dots
    assert xla_options.compiler_options("cpu", jnp.bfloat16) == dots
    assert xla_options.compiler_options("gpu") is None
    assert xla_options.compiler_options("gpu", "bfloat16") is None
    monkeypatch.setenv("XLA_FLAGS", f"--{YNN}=LIBRARY_FUSION_TYPE_DOT")  # the user's own choice wins
    assert xla_options.compiler_options("cpu") is None
    assert xla_options.compiler_options("cpu", "bfloat16") is None
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv(xla_options.DEFAULTS_ENV, "1")
    assert xla_options.compiler_options("cpu") is None


ZEN3_FLAGS = "flags\t\t: fpu vme sse2 avx avx2 fma bmi2 vaes vpclmulqdq rdpid"
ZEN4_FLAGS = "flags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni"
XEON_AMX_FLAGS = "flags\t\t: fpu sse2 avx2 avx512f amx_bf16 amx_tile amx_int8"
ARM_BF16 = "Features\t: fp asimd evtstrm aes sha1 sha2 crc32 atomics bf16 i8mm sve"
ARM_PLAIN = "Features\t: fp asimd evtstrm aes sha1 sha2 crc32"


@pytest.mark.parametrize(
    "cpuinfo, expected",
    [
        (f"processor\t: 0\n{ZEN3_FLAGS}\nprocessor\t: 1\n{ZEN3_FLAGS}\n", False),
        (f"processor\t: 0\n{ZEN4_FLAGS}\n", True),
        (f"processor\t: 0\n{XEON_AMX_FLAGS}\n", True),
        (f"processor\t: 0\n{ARM_BF16}\n", True),
        (f"processor\t: 0\n{ARM_PLAIN}\n", False),
        ("processor\t: 0\nmodel name\t: something\n", None),  # no flags: cannot tell
    ],
)
def test_cpu_bfloat16_arithmetic_is_read_from_the_flags(cpuinfo, expected):
    assert xla_options.cpu_has_bfloat16_arithmetic(cpuinfo) is expected


@pytest.mark.parametrize("units", [False, True, None])
def test_bfloat16_on_a_cpu_without_bfloat16_arithmetic_warns_once(units, monkeypatch, caplog):
    monkeypatch.setattr(xla_options, "cpu_has_bfloat16_arithmetic", lambda: units)
    xla_options._warn_if_bfloat16_is_emulated.cache_clear()
    monkeypatch.setenv(xla_options.DEFAULTS_ENV, "1")  # warned also where XLA's defaults are kept
    with caplog.at_level("WARNING", logger=xla_options.__name__):
        xla_options.compiler_options("cpu", "float32")
        assert not caplog.records  # float32 never warns
        for _ in range(3):
            xla_options.compiler_options("cpu", "bfloat16")
        xla_options.compiler_options("gpu", "bfloat16")
    xla_options._warn_if_bfloat16_is_emulated.cache_clear()
    messages = [r.getMessage() for r in caplog.records]
    if units is False:
        assert len(messages) == 1 and "no bfloat16 arithmetic" in messages[0]
    else:  # has the units, or cannot tell: no warning
        assert messages == []


def test_predictor_programs_are_compiled_without_ynn_fusions(thumos_small, monkeypatch):
    """The option reaches XLA: the compiled network holds no YNNPACK fusion (jaxlib 0.10 makes many by default)."""
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("the option is for the CPU backend")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.delenv(xla_options.DEFAULTS_ENV, raising=False)
    cfg = load_config(thumos_small / "config.yaml")
    params = convert_checkpoint(cfg, thumos_small / "state_dict.npz")
    text = Predictor(cfg, params).executable(256).as_text()
    assert "fusion" in text and "__ynn_fusion" not in text
    # bfloat16: dots go to YNNPACK (its bfloat16 kernels)
    bf16 = load_config(thumos_small / "config.yaml", ["inference.dtype=bfloat16"])
    text = Predictor(bf16, params).executable(256).as_text()
    ynn_fusions = [line for line in text.splitlines() if "__ynn_fusion" in line and " fusion(" in line]
    assert ynn_fusions and "bf16" in text
