"""divisive_jax: saliency-guided training of binary image classifiers in JAX/Flax."""
