"""Test-wide JAX settings: broadcasting and dtype bugs fail loudly."""

import jax

# A wrong shape that would broadcast across ranks raises instead of passing.
jax.config.update("jax_numpy_rank_promotion", "raise")
