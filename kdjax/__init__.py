"""kdjax: knowledge distillation of language models in JAX/Flax."""
