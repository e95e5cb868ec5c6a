"""`normal(key, shape)`: the numbers of `jax.random.normal(key, shape)`, bit for bit, in one fused pass.

The training step draws the input noise (`model.input_noise`: 9.4 M normals per THUMOS batch) this way. JAX
lowers its Threefry-2x32 hash on the CPU as a loop over its five groups of four rounds (to compile faster),
and each trip reads and writes two [B, T, C] uint32 arrays: 133 ms per THUMOS batch on two threads, 173-281
ms on one (AMD EPYC Zen 4, 2026-12-07). Written out here, XLA fuses the 20 rounds, the uniform and erf_inv into
the one loop that adds the noise: 38.5 / 58.6 ms. The hash is Threefry-2x32 with 20 rounds (Salmon et al.,
"Parallel random numbers: as easy as 1, 2, 3", SC 2011); keys and counters are laid out as JAX lays out
partitionable bits (`jax_threefry_partitionable`, JAX's default): element i hashes the counter (0, i) and
keeps the xor of the two output words. Where JAX would lay them out otherwise (another PRNG, the old
layout, 2^32 elements or more, a dtype other than float32) this calls `jax.random.normal`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))  # Threefry-2x32's rotation constants, alternating per 4 rounds
KEY_PARITY = np.uint32(0x1BD11BDA)  # Threefish's key-schedule constant C240, 32-bit


def normal(key: jax.Array, shape: tuple[int, ...], dtype=jnp.float32) -> jax.Array:
    """Standard normal samples equal to `jax.random.normal(key, shape, dtype)`; `key`: uint32[2] key data
    (as `jax.random.split` of such data returns) or a threefry typed key."""
    if not _same_layout_as_jax(key, shape, dtype):
        return jax.random.normal(key, shape, dtype)
    k0, k1 = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
    counter = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)  # row-major index; high word 0
    word0, word1 = threefry2x32(k0, k1, jnp.zeros_like(counter), counter)
    bits = word0 ^ word1
    # jax.random.uniform on [nextafter(-1, 0), 1): 23 random mantissa bits of a float in [1, 2), then scaled.
    unit = jax.lax.bitcast_convert_type((bits >> np.uint32(9)) | np.uint32(0x3F800000), jnp.float32) - 1.0
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    u = jnp.maximum(low, unit * (np.float32(1.0) - low) + low)
    return np.float32(np.sqrt(2.0)) * jax.lax.erf_inv(u)


def threefry2x32(k0: jax.Array, k1: jax.Array, x0: jax.Array, x1: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Threefry-2x32, 20 rounds: the key (k0, k1) hashes the counters (x0, x1) elementwise (uint32)."""
    schedule = (k0, k1, k0 ^ k1 ^ KEY_PARITY)
    x0, x1 = x0 + schedule[0], x1 + schedule[1]
    for group in range(5):
        for rotation in ROTATIONS[group % 2]:
            x0 = x0 + x1
            x1 = ((x1 << np.uint32(rotation)) | (x1 >> np.uint32(32 - rotation))) ^ x0
        x0 = x0 + schedule[(group + 1) % 3]
        x1 = x1 + schedule[(group + 2) % 3] + np.uint32(group + 1)
    return x0, x1


def _same_layout_as_jax(key: jax.Array, shape: tuple[int, ...], dtype) -> bool:
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        threefry = str(jax.random.key_impl(key)) == "threefry2x32"
    else:
        threefry = key.shape == (2,) and key.dtype == jnp.uint32 and jax.config.jax_default_prng_impl == "threefry2x32"
    return (
        threefry
        and jax.config.jax_threefry_partitionable
        and math.prod(shape) < 2**32
        and jnp.dtype(dtype) == jnp.float32
    )
