"""A student's Qwix options, fields of its ModelConfig (kdjax.model): quantized training and
evaluation (QuantConfig, config.student_quant) and LoRA adapters (LoraConfig,
config.student_lora). kdjax.qwix_model builds the module they describe."""

from __future__ import annotations

import dataclasses

# Every dense layer of the blocks (attention q/k/v/out, MLP gate/up/down), scanned or unrolled;
# not the embedding, whose tied unembedding and lookup Qwix cannot quantize consistently.
DENSE_LAYERS = r"(layers|layer_\d+)/(attn/(query|key|value|out)|mlp/(gate|up|down))"


@dataclasses.dataclass(frozen=True)
class QuantConfig:
  """config.student_quant: a student trained with fake-quantized weights (Qwix QAT, kdjax.qwix_model)
  and evaluated with really quantized ones (Qwix PTQ of the final params, kdjax.quantize)."""

  weight: str = ""  # 'int8' or 'int4'; '' = off
  act: str = ""  # '' (weights only) or 'int8'
  tile_size: int = 0  # 0 = one scale per output channel; else per tile of the contracted axis
  modules: str = DENSE_LAYERS  # regex, fully matched against Linen module paths
  # Quantization delay: steps before this one train the float weights (kdjax.train); 0 = QAT
  # from the first step.
  start_step: int = 0


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """config.student_lora: only low-rank adapters are trained (Qwix LoRA, kdjax.lora); output =
  base + (x A) B * alpha / rank, B initialised at zero."""

  rank: int = 0  # 0 = off
  alpha: float = 16.0
  modules: str = DENSE_LAYERS
