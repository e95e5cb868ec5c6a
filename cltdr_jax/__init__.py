"""cltdr-jax: CLTDR-GMG temporal action localization in JAX/Flax."""

__version__ = "0.1.0"
