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
