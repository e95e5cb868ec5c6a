"""JAX's persistent compilation cache, and a counter of the compilations that actually ran."""

from __future__ import annotations

import os
from pathlib import Path

import jax

_LISTENING = False
_COUNTS = {"compiled": 0, "cache_hits": 0}

CACHE_DIR_ENV = "CLTDR_XLA_CACHE"


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_DIR_ENV, Path.home() / ".cache" / "cltdr_jax" / "xla"))


def enable_persistent_cache(cache_dir: str | Path | None = None) -> Path:
    """Turns on JAX's on-disk compilation cache, so a second run of the same shapes compiles nothing."""
    path = Path(cache_dir) if cache_dir else default_cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    # Cache every program, however small or quick to compile: inference compiles one per padded length.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)
    _listen()
    return path


def _listen() -> None:
    global _LISTENING
    if _LISTENING:
        return

    def on_event(event: str, **_kwargs) -> None:
        if event == "/jax/compilation_cache/cache_misses":
            _COUNTS["compiled"] += 1
        elif event == "/jax/compilation_cache/cache_hits":
            _COUNTS["cache_hits"] += 1

    jax.monitoring.register_event_listener(on_event)
    _LISTENING = True


def compile_counts() -> dict[str, int]:
    """{"compiled": XLA compilations run, "cache_hits": programs loaded from the on-disk cache} so far."""
    return dict(_COUNTS)
