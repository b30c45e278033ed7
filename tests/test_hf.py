"""kdjax.hf against transformers itself: tiny random models of every family, built and saved by
transformers (no hub), must give kdjax the same logits; kdjax's exports must load in transformers
with the same logits.

Every weight is randomised (norm scales and biases too, which transformers initialises to 1 and
0), so a mis-mapped norm, bias or head layout cannot hide. Logits are compared in float32 at the
real (unpadded) positions of a batch padded on the right and on the left; the tolerance is 1e-4 of the logit scale.
"""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from support.quick import first_quick

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdjax import hf  # noqa: E402
from kdjax.model import ModelConfig, Transformer  # noqa: E402

V, L = 96, 12
# Row 0 is full, row 1 ends in 3 padding tokens, row 2 starts with 7: padding on both sides.
PADDING = ((0, 0), (0, 3), (7, 0))
COMMON = dict(vocab_size=V, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)

# One tiny config per family, each with the family's distinctive features switched on.
FAMILIES = {
    # Llama 3 RoPE scaling with original_max_position_embeddings=64: head_dim 8 gives
    # wavelengths 6.3, 63 and 628, one in each regime (kept, blended, slowed).
    "llama": (transformers.LlamaConfig, dict(COMMON, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=64), rope_theta=10_000.0, tie_word_embeddings=False)),
    "mistral": (transformers.MistralConfig, dict(COMMON, sliding_window=4, head_dim=8)),
    "qwen2": (transformers.Qwen2Config, dict(COMMON, rope_theta=1e6, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(COMMON, head_dim=16, tie_word_embeddings=False)),
    # Gemma 1's released configs say hidden_act="gelu", which transformers runs as tanh-GELU.
    "gemma": (transformers.GemmaConfig, dict(COMMON, head_dim=16, hidden_act="gelu")),
    # Soft-caps low enough that tanh bends the scores and logits; windows shorter than L.
    "gemma2": (transformers.Gemma2Config, dict(
        COMMON, head_dim=16, query_pre_attn_scalar=24, sliding_window=4,
        attn_logit_softcapping=2.0, final_logit_softcapping=3.0,
        hidden_activation="gelu_pytorch_tanh")),
    "gpt2": (transformers.GPT2Config, dict(vocab_size=V, n_embd=32, n_layer=3, n_head=4,
                                           n_positions=64, n_inner=48,
                                           bos_token_id=1, eos_token_id=2)),
}


def _randomise(model, seed):
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def _hf_model(family, seed=0, dtype=torch.float32):
  cls, kwargs = FAMILIES[family]
  config = cls(**kwargs)
  config._attn_implementation = "eager"
  model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
  _randomise(model, seed)
  return model.eval()


def _batch():
  tokens = np.random.default_rng(0).integers(0, V, size=(len(PADDING), L)).astype(np.int32)
  mask = np.array([[left <= i < L - right for i in range(L)] for left, right in PADDING],
                  np.int32)
  return tokens * mask, mask


def _hf_logits(model, tokens, mask):
  with torch.no_grad():
    out = model(input_ids=torch.tensor(tokens, dtype=torch.long),
                attention_mask=torch.tensor(mask, dtype=torch.long))
  return out.logits.float().numpy()


@functools.lru_cache(maxsize=None)
def _forward(cfg):
  """kdjax's forward for `cfg`, jitted once (several tests run the same config)."""
  return jax.jit(Transformer(cfg).apply)


def _kdjax_logits(cfg, params, tokens, mask):
  # Padding is segment 0, so real tokens never attend to it; positions are the column index, as
  # transformers numbers them without a cache, left padding included.
  positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
  return np.asarray(_forward(cfg)({"params": params}, jnp.asarray(tokens), jnp.asarray(mask),
                                  jnp.asarray(positions)))


def _assert_close(ours, theirs, mask):
  real = mask.astype(bool)
  scale = np.abs(theirs[real]).max()
  err = np.abs(ours[real] - theirs[real]).max()
  assert err < 1e-4 * scale, (err, scale)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """Each family's random model, saved by transformers."""
  out = {}
  for family in FAMILIES:
    path = str(tmp_path_factory.mktemp(family))
    model = _hf_model(family)
    model.save_pretrained(path)
    out[family] = (path, model)
  return out


@pytest.mark.parametrize("family", first_quick(sorted(FAMILIES)))
def test_loaded_logits_equal_transformers(saved, family):
  path, model = saved[family]
  cfg, params = hf.load_pretrained(path)
  assert cfg.family == family and cfg.param_dtype == "float32"
  tokens, mask = _batch()
  _assert_close(_kdjax_logits(cfg, params, tokens, mask), _hf_logits(model, tokens, mask), mask)


@pytest.mark.parametrize("family", first_quick(sorted(FAMILIES)))
def test_export_loads_in_transformers_with_equal_logits(tmp_path, family):
  # A kdjax model of the family's shape with its own random weights (not read from transformers):
  # the export alone must carry it over.
  cfg = hf.model_config(_hf_model(family).config.to_dict())
  like = hf.abstract_params(cfg)
  rng = np.random.default_rng(1)  # numpy draws: no compile per parameter shape
  params = jax.tree.map(
      lambda x: jnp.asarray(0.3 * rng.standard_normal(x.shape), jnp.float32), like)
  hf.save_pretrained(str(tmp_path), cfg, params)
  model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                            attn_implementation="eager")
  assert type(model).__name__ == hf.ARCHITECTURES[family]
  tokens, mask = _batch()
  _assert_close(_kdjax_logits(cfg, params, tokens, mask), _hf_logits(model.float(), tokens, mask),
                mask)


def test_unscanned_layers_load_the_same(saved):
  path, _ = saved["gemma2"]
  cfg, params = hf.load_pretrained(path)
  cfg_u, params_u = hf.load_pretrained(path, scan_layers=False)
  assert not cfg_u.scan_layers and "layer_2" in params_u
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[params_u[f"layer_{i}"] for i in range(3)])
  jax.tree.map(np.testing.assert_array_equal, stacked, params["layers"])
  tokens, mask = _batch()
  # Scanned and unrolled layers compile differently: equal up to float reassociation.
  ours, theirs = (_kdjax_logits(c, p, tokens, mask) for c, p in ((cfg, params), (cfg_u, params_u)))
  np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5 * np.abs(theirs).max())


def test_bf16_stays_bf16_bit_for_bit(tmp_path):
  model = _hf_model("qwen2", dtype=torch.bfloat16)
  model.save_pretrained(str(tmp_path))
  cfg, params = hf.load_pretrained(str(tmp_path))
  assert cfg.param_dtype == "bfloat16" and cfg.dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
  q = model.model.layers[1].self_attn.q_proj.weight.detach().float().numpy()  # [H*K, D]
  ours = np.asarray(params["layers"]["attn"]["query"]["kernel"][1]).astype(np.float32)
  np.testing.assert_array_equal(ours.reshape(q.shape[1], -1).T, q)
  # Asked for f32, it casts on read.
  cfg32, params32 = hf.load_pretrained(str(tmp_path), param_dtype="float32")
  assert {x.dtype for x in jax.tree.leaves(params32)} == {jnp.dtype(jnp.float32)}


def test_sharded_export_has_an_index_and_round_trips(saved, tmp_path):
  path, model = saved["llama"]
  cfg, params = hf.load_pretrained(path)
  hf.save_pretrained(str(tmp_path), cfg, params, max_shard_bytes=20_000)
  with open(tmp_path / "model.safetensors.index.json") as f:
    files = set(json.load(f)["weight_map"].values())
  assert len(files) > 1 and files == {p for p in os.listdir(tmp_path)
                                      if p.endswith(".safetensors")}
  cfg2, params2 = hf.load_pretrained(str(tmp_path))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params, params2)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path),
                                                               attn_implementation="eager")
  tokens, mask = _batch()
  np.testing.assert_array_equal(_hf_logits(reloaded, tokens, mask), _hf_logits(model, tokens, mask))


def test_original_gpt2_layout_without_prefix_loads(saved, tmp_path):
  # The hub's gpt2 files were saved from the bare GPT2Model: keys 'h.0....', 'wte.weight'.
  from safetensors.numpy import load_file, save_file
  path, model = saved["gpt2"]
  tensors = load_file(os.path.join(path, "model.safetensors"))
  bare = {k[len("transformer."):]: v for k, v in tensors.items() if k.startswith("transformer.")}
  bare["h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # an old mask buffer
  save_file(bare, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  os.link(os.path.join(path, "config.json"), tmp_path / "config.json")
  cfg, params = hf.load_pretrained(str(tmp_path))
  tokens, mask = _batch()
  _assert_close(_kdjax_logits(cfg, params, tokens, mask), _hf_logits(model, tokens, mask), mask)


def test_bad_checkpoints_are_one_clear_error(saved, tmp_path):
  path, _ = saved["llama"]
  (tmp_path / "pytorch_model.bin").write_bytes(b"not read")
  os.link(os.path.join(path, "config.json"), tmp_path / "config.json")
  with pytest.raises(hf.HFError, match="never loads"):
    hf.load_pretrained(str(tmp_path))
  with pytest.raises(hf.HFError, match="not supported"):
    hf.model_config({"model_type": "bert"})
  # A config.json that does not fit the tensors: named before anything is read.
  bad = dict(hf.read_config(path), num_hidden_layers=4)
  wrong = tmp_path / "wrong"
  wrong.mkdir()
  (wrong / "config.json").write_text(json.dumps(bad))
  os.link(os.path.join(path, "model.safetensors"), wrong / "model.safetensors")
  with pytest.raises(hf.HFError, match="layers.3.*missing"):
    hf.load_pretrained(str(wrong))
  bad = dict(hf.read_config(path), intermediate_size=40)
  (wrong / "config.json").write_text(json.dumps(bad))
  with pytest.raises(hf.HFError, match="do not fit config.json"):
    hf.load_pretrained(str(wrong))


def test_a_family_that_cannot_express_the_model_is_refused():
  cfg = ModelConfig(family="llama", attn_softcap=50.0)
  with pytest.raises(hf.HFError, match="attn_softcap"):
    hf.hf_config(cfg)


_SHARDED_LOAD = """
import sys
import kdjax, jax, numpy as np
from kdjax import hf, sharding, train
from kdjax.state import param_shardings
path = sys.argv[1]
mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
cfg, params = hf.load_pretrained(path, mesh=mesh, rules=sharding.DEFAULT_RULES)
want = param_shardings(cfg, mesh, sharding.DEFAULT_RULES)
_, single = hf.load_pretrained(path)
split = 0
for x, s, y in zip(jax.tree.leaves(params), jax.tree.leaves(want), jax.tree.leaves(single)):
  assert x.sharding.is_equivalent_to(s, x.ndim), (x.sharding, s)
  np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  split += x.addressable_shards[0].data.size < x.size
assert split >= 5, split  # most params really are split across devices
print("ok", split)
"""


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_loads_straight_into_a_sharded_layout(saved):
  # 8 CPU devices need a fresh process (the device count is fixed when JAX starts).
  import subprocess
  import sys
  path, _ = saved["qwen3"]
  env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                    " --xla_force_host_platform_device_count=8"))
  out = subprocess.run([sys.executable, "-c", _SHARDED_LOAD, path], env=env, capture_output=True,
                       text=True, timeout=300,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert out.returncode == 0 and out.stdout.startswith("ok"), out.stderr[-2000:]


def _copy_model(src, dst, config_edit=None, extra=None):
  """A copy of model directory `src` (hard links) with config.json edited and files added."""
  os.makedirs(dst)
  for name in os.listdir(src):
    os.link(os.path.join(src, name), os.path.join(dst, name))
  if config_edit:
    config = config_edit(hf.read_config(src))
    os.unlink(os.path.join(dst, "config.json"))
    with open(os.path.join(dst, "config.json"), "w") as f:
      json.dump(config, f)
  for name, tensors in (extra or {}).items():
    from safetensors.numpy import save_file
    save_file(tensors, os.path.join(dst, name), metadata={"format": "pt"})


def test_fields_a_config_leaves_out_take_transformers_defaults(saved, tmp_path):
  # Without the soft-cap fields transformers caps at 50 and 30: kdjax must do the same.
  path, _ = saved["gemma2"]
  drop = ("attn_logit_softcapping", "final_logit_softcapping")
  bare = str(tmp_path / "bare")
  _copy_model(path, bare, lambda c: {k: v for k, v in c.items() if k not in drop})
  cfg, params = hf.load_pretrained(bare)
  assert (cfg.attn_softcap, cfg.logit_softcap) == (50.0, 30.0)
  model = transformers.AutoModelForCausalLM.from_pretrained(bare, attn_implementation="eager")
  tokens, mask = _batch()
  _assert_close(_kdjax_logits(cfg, params, tokens, mask), _hf_logits(model, tokens, mask), mask)
  with pytest.raises(hf.HFError, match="missing field 'hidden_size'"):
    hf.model_config({k: v for k, v in hf.read_config(path).items() if k != "hidden_size"})


def test_only_the_indexed_or_named_files_are_read(saved, tmp_path):
  # Mistral's repositories keep consolidated.safetensors (another layout) beside the HF files,
  # and a tied model may still carry lm_head.weight: transformers ignores both, so does kdjax.
  path, model = saved["mistral"]
  stray = {"consolidated.safetensors": {"tok_embeddings.weight": np.zeros((V, 32), np.float32)}}
  copy = str(tmp_path / "mistral")
  _copy_model(path, copy, extra=stray)
  cfg, params = hf.load_pretrained(copy)
  tokens, mask = _batch()
  _assert_close(_kdjax_logits(cfg, params, tokens, mask), _hf_logits(model, tokens, mask), mask)
  qwen, _ = saved["qwen2"]  # tied
  from safetensors.numpy import load_file
  tensors = load_file(os.path.join(qwen, "model.safetensors"))
  tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]
  tied = str(tmp_path / "tied")
  _copy_model(qwen, tied)
  os.unlink(os.path.join(tied, "model.safetensors"))
  from safetensors.numpy import save_file
  save_file(tensors, os.path.join(tied, "model.safetensors"), metadata={"format": "pt"})
  assert hf.load_pretrained(tied)[0].tie_embeddings


def test_bf16_tensors_without_a_dtype_in_config_stay_bf16(tmp_path):
  model = _hf_model("llama", dtype=torch.bfloat16)
  model.save_pretrained(str(tmp_path / "m"))
  _copy_model(str(tmp_path / "m"), str(tmp_path / "c"),
              lambda c: {k: v for k, v in c.items() if k not in ("dtype", "torch_dtype")})
  cfg, params = hf.load_pretrained(str(tmp_path / "c"))
  assert cfg.param_dtype == "bfloat16"
  assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


def test_how_attention_and_remat_run_do_not_stop_an_export():
  """attention_impl, attention_block_size and remat_policy are not in config.json, and what
  reads back is the same model; a field of the model's math still has to be expressible."""
  cfg = hf.model_config(_hf_model("llama").config.to_dict())
  runs_differently = dataclasses.replace(cfg, attention_impl="blockwise", attention_block_size=64,
                                         remat_policy="dots")
  assert hf.hf_config(runs_differently) == hf.hf_config(cfg)
  with pytest.raises(hf.HFError, match="cannot express attn_softcap"):
    hf.hf_config(dataclasses.replace(cfg, attn_softcap=30.0))
