"""Param trees for tests: random init-like values that exercise every param, and scan <-> loop."""

import jax


def random_param(path, shape, rng):
  """Init-like scales (LeCun fan-in kernels, embedding std D^-0.5) so logits are O(1), but norm
  scales 1 + N(0, 0.3^2) and biases N(0, 0.1^2): a norm that ignored or swapped its params would
  still match an oracle fed the init values of exactly 1 and 0."""
  name, parent = path[-1].key, path[-2].key
  z = rng.standard_normal(shape)
  if name == "scale":
    return 1.0 + 0.3 * z
  if name == "bias":
    return 0.1 * z
  if name == "embedding":
    return z * shape[-1] ** -0.5
  if parent in ("query", "key", "value"):  # [S,] D x H x K
    fan_in = shape[-3]
  elif parent == "out":  # [S,] H x K x D
    fan_in = shape[-3] * shape[-2]
  else:  # [S,] in x out
    fan_in = shape[-2]
  return z * fan_in ** -0.5


def unscan_params(params, num_layers):
  """Stacked 'layers' tree (leading axis S) -> per-layer 'layer_{i}' entries."""
  out = {k: v for k, v in params.items() if k != "layers"}
  for i in range(num_layers):
    out[f"layer_{i}"] = jax.tree.map(lambda a, i=i: a[i], params["layers"])
  return out
