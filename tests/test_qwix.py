"""Quantized (Qwix QAT / PTQ) and LoRA students: kdjax.qwix_model, kdjax.quantize, kdjax.lora.

Oracles: a numpy per-channel quantize-dequantize of each kernel, the plain model run on numpy's
weights, transformers (merged export) and PEFT (adapter export).
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import shakespeare
from kdjax import evaluate, lora, optim, qwix_model, quantize, settings, sharding, train
from kdjax.config_check import ConfigError, check_config
from kdjax.model import LoraConfig, ModelConfig, QuantConfig, Transformer, unstack_layers
from kdjax.settings import DistillSettings, OnPolicy
from kdjax.state import create_train_state, lora_seed_base
from support.params import random_param

CFG = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=48, max_len=32, tie_embeddings=False)
B, L = 3, 12
TRAIN = ml_collections.ConfigDict(dict(steps=10, learning_rate=1e-2, warmup_steps=1,
                                       end_lr_fraction=0.1, weight_decay=0.1, grad_clip=1.0,
                                       b1=0.9, b2=0.95, grad_accum_steps=1))


def _params(cfg, seed=0):
  """Random params (every kernel non-trivial) of `cfg`'s plain model."""
  shapes = jax.eval_shape(lambda: Transformer(cfg.plain).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map_with_path(
      lambda p, s: jnp.asarray(random_param(p, s.shape, rng), jnp.float32),
      jax.tree.map(lambda x: x.unbox() if hasattr(x, "unbox") else x, shapes,
                   is_leaf=lambda x: hasattr(x, "unbox")))


def _batch(seed=0):
  rng = np.random.default_rng(seed)
  tokens = rng.integers(1, CFG.vocab_size, (B, L + 1)).astype(np.int32)
  pos = np.broadcast_to(np.arange(L, dtype=np.int32), (B, L))
  return {"inputs": jnp.asarray(tokens[:, :-1]), "targets": jnp.asarray(tokens[:, 1:]),
          "segment_ids": jnp.ones((B, L), jnp.int32), "positions": jnp.asarray(pos),
          "mask": jnp.ones((B, L), jnp.float32)}


def _logits(module, params, batch):
  return jax.jit(module.apply)({"params": params}, batch["inputs"], batch["segment_ids"],
                               batch["positions"])


def _grouped(w, contracted, tile):
  """(w viewed with the last contracted axis split into tiles, the axes one scale spans)."""
  if not tile:
    return w, tuple(contracted)
  ax = contracted[-1]
  tiled = w.reshape(w.shape[:ax] + (w.shape[ax] // tile, tile) + w.shape[ax + 1:])
  return tiled, tuple(a if a < ax else a + 1 for a in contracted[:-1]) + (ax + 1,)


def _positive_absmax(w, contracted, tile=0):
  """`w` with each scale group's sign flipped so that its largest magnitude is positive.

  That element quantizes to exactly +-(qmax + 0.5) before rounding: at +, both neighbours of
  the tie clip to qmax, but at - it is -qmax - 1 or -qmax as one float32 ulp of the scale falls.
  Positive, the quantized weight is defined to the bit, so the oracle can be exact."""
  g, axes = _grouped(np.asarray(w, np.float32), contracted, tile)
  big = np.max(np.abs(g), axis=axes, keepdims=True)
  sign = np.where(np.max(g, axis=axes, keepdims=True) == big, 1.0, -1.0).astype(np.float32)
  return (g * sign).reshape(np.shape(w))


def _np_fake_quant(w, contracted, qmax, tile=0):
  """Symmetric absmax quantize-dequantize in numpy: one scale per output channel (or per tile
  of the last contracted axis), scale = absmax / (qmax + 0.5) as Qwix calibrates, round half
  to even, clip to the integer range [-qmax - 1, qmax]."""
  g, axes = _grouped(np.asarray(w, np.float64), contracted, tile)
  scale = np.max(np.abs(g), axis=axes, keepdims=True) / (qmax + 0.5)
  return (np.clip(np.round(g / scale), -qmax - 1, qmax) * scale).reshape(np.shape(w))


# The contracted axes of each dense kernel of one unrolled layer.
_CONTRACTED = {"query": (0,), "key": (0,), "value": (0,), "out": (0, 1), "gate": (0,),
               "up": (0,), "down": (0,)}


def _map_kernels(fn, params):
  """`params` (unrolled layers) with fn(kernel, contracted axes) applied to each dense kernel."""
  out = jax.tree.map(np.asarray, params)
  for i in range(CFG.num_layers):
    for group, names in (("attn", ("query", "key", "value", "out")),
                         ("mlp", ("gate", "up", "down"))):
      for name in names:
        leaf = out[f"layer_{i}"][group][name]
        leaf["kernel"] = fn(leaf["kernel"], _CONTRACTED[name])
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), out)


def _np_quantized_params(params, qmax, tile=0):
  return _map_kernels(lambda w, c: _np_fake_quant(w, c, qmax, tile), params)


def _unrolled(cfg):
  return dataclasses.replace(cfg, scan_layers=False)


@pytest.mark.parametrize("qtype, qmax, tile", [("int8", 127, 0), ("int4", 7, 8)])
def test_fake_quant_forward_matches_a_numpy_quantize_dequantize_oracle(qtype, qmax, tile):
  cfg = dataclasses.replace(_unrolled(CFG), quant=QuantConfig(weight=qtype, tile_size=tile))
  params = _map_kernels(lambda w, c: _positive_absmax(w, c, tile), _params(cfg))
  batch = _batch()
  ours = np.asarray(_logits(qwix_model.build(cfg), params, batch))
  oracle = np.asarray(_logits(Transformer(cfg.plain), _np_quantized_params(params, qmax, tile),
                              batch))
  plain = np.asarray(_logits(Transformer(cfg.plain), params, batch))
  scale = np.abs(oracle).max()
  # Both multiply the same integer grid's weights: what may differ is float32 rounding of the
  # rescale and the matmuls (1e-5 of the logit scale), a hundred times less than quantizing
  # moves the logits (the second check).
  assert np.abs(ours - oracle).max() <= 1e-5 * scale
  assert np.abs(plain - oracle).max() > 100 * 1e-5 * scale


@functools.lru_cache(maxsize=None)
def _mesh():
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1})


def _state(cfg, tx, seed=1):
  return create_train_state(cfg, tx, seed, _mesh(), sharding.DEFAULT_RULES)[0]


@functools.lru_cache(maxsize=None)
def _jitted_step(cfg):
  """One compiled step per config (equal configs share it)."""
  return jax.jit(train.make_train_step(cfg, optim.make_optimizer(TRAIN),
                                       optim.make_schedule(TRAIN)))


def _step(cfg, tx, batch, steps=2, seed=1):
  state = _state(cfg, tx, seed)
  step = _jitted_step(cfg)
  for _ in range(steps):
    state, metrics = step(state, None, batch)
  return state, metrics


def test_quantization_off_trains_exactly_the_plain_student():
  """The config path with student_quant and student_lora present but off builds the plain
  student: the same params bit for bit after two steps as a config without the sections."""
  config = ml_collections.ConfigDict({"student": settings.model_section(
      **{f.name: getattr(CFG, f.name) for f in dataclasses.fields(CFG)
         if f.name not in ("quant", "lora")})})
  plain_cfg = settings.student_model(config)
  settings.student_sections(config)
  with_sections = settings.student_model(config)
  assert with_sections == plain_cfg == CFG
  assert isinstance(qwix_model.build(with_sections), Transformer)
  tx, batch = optim.make_optimizer(TRAIN), _batch()
  a, _ = _step(plain_cfg, tx, batch)
  b, _ = _step(with_sections, tx, batch)
  jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)),
               a.params, b.params)
  # ... and QAT is not a no-op: int8 moves the same step's params.
  c, _ = _step(dataclasses.replace(CFG, quant=QuantConfig(weight="int8")), tx, batch)
  assert not np.array_equal(np.asarray(c.params["layers"]["mlp"]["up"]["kernel"]),
                            np.asarray(a.params["layers"]["mlp"]["up"]["kernel"]))


@pytest.mark.slow  # compiles four whole training steps: full suite only
def test_a_quantization_delay_trains_float_weights_until_its_step():
  tx, batch = optim.make_optimizer(TRAIN), _batch()
  int8 = dataclasses.replace(CFG, quant=QuantConfig(weight="int8"))
  plain, _ = _step(CFG, tx, batch, steps=2)
  before, _ = _step(dataclasses.replace(int8, quant=QuantConfig(weight="int8", start_step=2)),
                    tx, batch, steps=2)
  after, _ = _step(dataclasses.replace(int8, quant=QuantConfig(weight="int8", start_step=1)),
                   tx, batch, steps=2)
  leaf = lambda s: np.asarray(s.params["layers"]["mlp"]["up"]["kernel"])
  np.testing.assert_array_equal(leaf(before), leaf(plain))  # two float steps
  assert not np.array_equal(leaf(after), leaf(plain))  # one float step, then one QAT step


@pytest.mark.parametrize("qtype, bits", [("int8", 8), ("int4", 4)])
def test_ptq_evaluation_runs_integer_weights(qtype, bits):
  cfg = dataclasses.replace(CFG, quant=QuantConfig(weight=qtype))  # scanned: unrolled first
  unrolled = _map_kernels(_positive_absmax, unstack_layers(CFG, _params(cfg))[1])
  params = {k: v for k, v in unrolled.items() if not k.startswith("layer_")}
  params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *[
      unrolled[f"layer_{i}"] for i in range(CFG.num_layers)])
  q_cfg, q_params = quantize.quantize(cfg, params)
  assert not q_cfg.scan_layers
  kernel = q_params["layer_1"]["mlp"]["down"]["kernel"]
  assert kernel.array.qvalue.dtype == jnp.dtype(qtype)
  assert kernel.array.qvalue.shape == (CFG.mlp_dim, CFG.d_model)
  assert kernel.array.scale.shape == (1, CFG.d_model)
  assert q_params["embed"]["embedding"].dtype == jnp.float32  # the embedding stays float
  # The quantized arrays are what evaluation runs: the same loss as the plain model on numpy's
  # quantize-dequantize of the weights, and not the float model's.
  batches = [{k: np.asarray(v) for k, v in _batch(s).items()} for s in range(2)]
  ours = evaluate.held_out_loss(cfg, params, batches)
  oracle = evaluate.held_out_loss(
      _unrolled(CFG), _np_quantized_params(unrolled, 2 ** (bits - 1) - 1), batches)
  float_loss = evaluate.held_out_loss(CFG, params, batches)
  assert ours == pytest.approx(oracle, rel=1e-5)
  assert abs(ours - oracle) * 20 < abs(ours - float_loss)
  # Bytes at the stored widths: quantized kernels at `bits`, their f32 scales, the rest f32.
  dense = sum(np.size(x) for x in jax.tree.leaves(_dense_kernels(unrolled)))
  scales = sum(k.array.scale.size for k in jax.tree.leaves(
      _dense_kernels(q_params), is_leaf=lambda x: hasattr(x, "array")))
  floats = sum(np.size(x) for x in jax.tree.leaves(params)) - dense
  assert quantize.weight_bytes(q_params) == dense * bits // 8 + 4 * (scales + floats)


def _dense_kernels(params):
  return {k: {g: {n: m["kernel"] for n, m in v[g].items()} for g in ("attn", "mlp")}
          for k, v in params.items() if k.startswith("layer_")}


def test_saved_quantized_params_load_and_evaluate_the_same(tmp_path):
  cfg = dataclasses.replace(CFG, quant=QuantConfig(weight="int4", tile_size=8))
  params = _params(cfg)
  q_cfg, q_params = quantize.quantize(cfg, params)
  quantize.save(str(tmp_path / "q"), q_cfg, q_params)
  back_cfg, back = quantize.load(str(tmp_path / "q"))
  assert back_cfg == q_cfg
  k = back["layer_0"]["attn"]["query"]["kernel"].array
  assert k.qvalue.dtype == jnp.int4
  np.testing.assert_array_equal(np.asarray(k.qvalue, np.int8), np.asarray(
      q_params["layer_0"]["attn"]["query"]["kernel"].array.qvalue, np.int8))
  batches = [{k: np.asarray(v) for k, v in _batch().items()}]
  assert (evaluate.held_out_loss(back_cfg, back, batches)
          == evaluate.held_out_loss(cfg, params, batches))


# ---------------------------------------------------------------------------------------- LoRA

LORA = dataclasses.replace(CFG, lora=LoraConfig(rank=4, alpha=8.0))


def test_lora_with_zero_b_is_its_base_and_trains_only_the_adapters():
  tx, batch = optim.make_optimizer(TRAIN), _batch()
  state = _state(LORA, tx)
  adapters = jax.tree_util.tree_flatten_with_path(state.params)[0]
  assert adapters and all(p[-1].key.endswith(lora.SUFFIXES) for p, _ in adapters)
  # B starts at zero: the LoRA model computes its base's logits exactly.
  full = lora.combine(state.frozen_params, state.params)
  np.testing.assert_array_equal(np.asarray(_logits(qwix_model.build(LORA), full, batch)),
                                np.asarray(_logits(Transformer(CFG), state.frozen_params, batch)))
  # The optimizer holds moments of the adapters alone.
  n_adapter = sum(x.size for x in jax.tree.leaves(state.params))
  n_opt = sum(x.size for x in jax.tree.leaves(state.opt_state))
  assert n_opt == 2 * n_adapter + 1  # Adam's two moments and its step count
  # On resume the base is rebuilt from the seed, not read from a checkpoint: it must be the
  # base that the init made.
  jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, state.frozen_params),
               jax.tree.map(np.asarray, lora_seed_base(LORA, 1, _mesh(), sharding.DEFAULT_RULES)))
  base_before = jax.tree.map(np.asarray, state.frozen_params)
  b_before = np.asarray(state.params["layers"]["attn"]["query"]["kernel_lora_b"])
  state, metrics = _step(LORA, tx, batch, steps=3)
  jax.tree.map(np.testing.assert_array_equal, base_before,
               jax.tree.map(np.asarray, state.frozen_params))
  b_after = np.asarray(state.params["layers"]["attn"]["query"]["kernel_lora_b"])
  assert np.all(b_before == 0) and np.abs(b_after).max() > 0
  assert np.isfinite(float(metrics["loss"]))


@pytest.mark.parametrize("scan", [True, False])
def test_a_bf16_lora_student_computes_in_bf16_and_starts_as_its_base(scan):
  """Adapters are float32 params; the layer's output stays in the compute dtype (under nn.scan
  a float32 output would not even trace), so with B = 0 the logits are the base's, bit for bit."""
  cfg = dataclasses.replace(LORA, dtype="bfloat16", scan_layers=scan)
  shapes = jax.eval_shape(lambda: qwix_model.build(cfg).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  adapters = jax.tree.map(lambda s: jnp.zeros(getattr(s, "value", s).shape, jnp.float32),
                          lora.split(shapes)[1], is_leaf=lambda x: hasattr(x, "value"))
  base = _params(dataclasses.replace(cfg, scan_layers=True))
  base = base if scan else unstack_layers(CFG, base)[1]
  batch = _batch()
  np.testing.assert_array_equal(
      np.asarray(_logits(qwix_model.build(cfg), lora.combine(base, adapters), batch)),
      np.asarray(_logits(Transformer(cfg.plain), base, batch)))


def test_merged_lora_computes_the_lora_model():
  base, adapters = _random_lora(seed=3)
  full = lora.combine(base, adapters)
  batch = _batch()
  ours = np.asarray(_logits(qwix_model.build(LORA), full, batch))
  merged = np.asarray(_logits(Transformer(CFG), lora.merged(LORA, full), batch))
  plain = np.asarray(_logits(Transformer(CFG), base, batch))
  scale = np.abs(ours).max()
  assert np.abs(merged - ours).max() <= 1e-5 * scale
  assert np.abs(plain - ours).max() > 1e-2 * scale  # the adapters matter


def _random_lora(seed, cfg=LORA):
  """A base and adapters with non-zero A and B."""
  base = _params(cfg, seed)
  shapes = jax.eval_shape(lambda: qwix_model.build(cfg).init(
      jax.random.key(0), jnp.zeros((1, 1), jnp.int32))["params"])
  _, adapter_shapes = lora.split(shapes)
  rng = np.random.default_rng(seed + 100)
  adapters = jax.tree.map(lambda s: jnp.asarray(0.2 * rng.standard_normal(
      getattr(s, "value", s).shape), jnp.float32), adapter_shapes,
                          is_leaf=lambda x: hasattr(x, "value"))
  return base, adapters


def test_lora_exports_load_in_transformers_and_peft(tmp_path):
  """The merged export in transformers, and the adapters alone through PEFT on the exported
  base, both give the unmerged kdjax LoRA model's logits (1e-4 of the logit scale)."""
  # The reference implementations (dev requirements only).
  import peft
  import torch
  import transformers

  from kdjax import hf
  from kdjax.hf import peft as hf_peft
  base, adapters = _random_lora(seed=5)
  batch = _batch()
  ours = np.asarray(_logits(qwix_model.build(LORA), lora.combine(base, adapters), batch))
  hf.save_pretrained(str(tmp_path / "merged"), LORA.plain,
                     lora.merged(LORA, lora.combine(base, adapters)))
  hf.save_pretrained(str(tmp_path / "base"), LORA.plain, base)
  hf_peft.save_peft(str(tmp_path / "adapters"), LORA, adapters)
  tokens = torch.tensor(np.asarray(batch["inputs"]), dtype=torch.long)

  def logits(model):
    with torch.no_grad():
      return model.eval()(input_ids=tokens).logits.float().numpy()

  merged = logits(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged")))
  with_adapters = logits(peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")),
      str(tmp_path / "adapters")))
  plain = logits(transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "base")))
  scale = np.abs(ours).max()
  assert np.abs(merged - ours).max() < 1e-4 * scale
  assert np.abs(with_adapters - ours).max() < 1e-4 * scale
  assert np.abs(plain - ours).max() > 1e-2 * scale


# --------------------------------------------------------------------------------- composition

T_CFG = ModelConfig(vocab_size=64, d_model=48, num_layers=3, num_heads=4, num_kv_heads=2,
                    head_dim=12, mlp_dim=64, max_len=32)


@pytest.mark.slow  # compiles six whole distillation steps: full suite only
@pytest.mark.parametrize("method", ["chunked", "features", "on_policy"])
def test_quantized_and_lora_students_compose_with_every_method(method):
  """Three steps of each method (the first at warmup's learning rate 0) with an int8 QAT and a
  LoRA student. The LoRA student's first loss is its base's (B = 0), which is the float
  student's: the int8 student's first loss differs from it, the LoRA adapters move and its
  base stays bit for bit."""
  distill = {"chunked": DistillSettings(loss_chunk_size=4),
             "features": DistillSettings(feature_weight=1.0, attention_weight=1.0),
             "on_policy": DistillSettings(on_policy=OnPolicy(1.0, prompt_tokens=4,
                                                             new_tokens=6))}[method]
  tx, batch = optim.make_optimizer(TRAIN), _batch()
  t_params = _params(T_CFG, seed=9)
  first = {}
  for name, cfg in (("int8", dataclasses.replace(CFG, quant=QuantConfig("int8"))),
                    ("lora", LORA)):
    state = create_train_state(cfg, tx, 1, _mesh(), sharding.DEFAULT_RULES, t_cfg=T_CFG,
                               distill=distill)[0]
    start = jax.tree.map(np.asarray, (state.params, state.frozen_params))
    step = jax.jit(train.make_train_step(cfg, tx, optim.make_schedule(TRAIN), t_cfg=T_CFG,
                                         distill=distill))
    for i in range(3):
      state, metrics = step(state, t_params, batch)
      assert np.isfinite(float(metrics["loss"])), (name, i, metrics)
      first.setdefault(name, float(metrics["loss"]))
    if name == "lora":
      jax.tree.map(np.testing.assert_array_equal, start[1],
                   jax.tree.map(np.asarray, state.frozen_params))
      b = state.params["layers"]["mlp"]["down"]["kernel_lora_b"]
      assert np.all(start[0]["layers"]["mlp"]["down"]["kernel_lora_b"] == 0)
      assert np.abs(np.asarray(b)).max() > 0
  assert first["int8"] != first["lora"], first


# ------------------------------------------------------------------------------- config checks

def _smoke():
  return shakespeare.get_config("smoke")


@pytest.mark.parametrize("overrides, field", [
    ({"student_quant.weight": "int3"}, "student_quant.weight"),
    ({"student_quant.act": "int8"}, "student_quant.act"),
    ({"student_quant.weight": "int4", "student_lora.rank": 8}, "student_lora"),
    ({"student_quant.weight": "int4", "student_quant.modules": "embed|layers/mlp/up"},
     "student_quant.modules"),
    ({"student_lora.rank": 8, "student_lora.modules": "layers/attn"}, "student_lora.modules"),
    ({"student_lora.rank": 8, "student_lora.modules": "layers/mlp/(nope"},
     "student_lora.modules"),
    ({"student_quant.weight": "int4", "student_quant.tile_size": 7}, "student_quant.tile_size"),
    ({"student_lora.rank": 8, "student_lora.alpha": 0.0}, "student_lora.alpha"),
])
def test_combinations_that_cannot_work_are_one_line_errors(overrides, field):
  config = _smoke()
  for key, value in overrides.items():
    section, name = key.split(".")
    config[section][name] = value
  with pytest.raises(ConfigError) as e:
    check_config(config, 1)
  assert "\n" not in str(e.value) and f"config.{field}" in str(e.value), str(e.value)
