"""threefry.normal: JAX's normal numbers, bit for bit, computed in one fused pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cltdr_jax import threefry


@pytest.mark.parametrize(
    ("key", "counter", "expected"),
    [  # Random123's known-answer vectors for threefry2x32_20 (kat_vectors)
        ((0, 0), (0, 0), (0x6B200159, 0x99BA4EFE)),
        ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
        ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0)),
    ],
)
def test_threefry2x32_known_answers(key, counter, expected):
    words = [jnp.asarray(np.uint32(v)) for v in (*key, *counter)]
    assert tuple(int(w) for w in threefry.threefry2x32(*words)) == expected


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5, 11), (2, 320, 16), (4, 1, 3)])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_normal_equals_jax_random_normal(shape, seed):
    key_data = jax.random.split(jax.random.PRNGKey(seed), 3)[1]  # uint32[2] key data, as the train step has
    typed = jax.random.key(seed)
    for key in (key_data, typed):
        ours = jax.jit(threefry.normal, static_argnums=1)(key, shape)
        np.testing.assert_array_equal(np.asarray(ours), np.asarray(jax.random.normal(key, shape)))


def test_normal_follows_jax_where_its_layout_differs():
    key_data = jax.random.PRNGKey(3)
    with jax.threefry_partitionable(False):  # JAX's older bit layout: threefry.normal must defer to it
        np.testing.assert_array_equal(threefry.normal(key_data, (6, 5)), jax.random.normal(key_data, (6, 5)))
    for key, dtype in ((jax.random.key(3, impl="rbg"), jnp.float32), (key_data, jnp.bfloat16)):
        np.testing.assert_array_equal(threefry.normal(key, (6, 5), dtype), jax.random.normal(key, (6, 5), dtype))


def test_normal_is_one_fused_pass_without_a_loop():
    """What it is for: JAX 0.10 lowers its hash on the CPU as a while loop over full-size arrays."""
    text = jax.jit(threefry.normal, static_argnums=1).lower(jax.random.PRNGKey(0), (64, 64)).compile().as_text()
    assert "while" not in text
