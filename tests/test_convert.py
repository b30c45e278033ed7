"""scripts/convert.py: a Hugging Face model -> a kdjax checkpoint usable as
config.teacher_checkpoint -> back to a Hugging Face model that transformers loads, unchanged."""

import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from kdjax import checkpoint, experiment, hf, sharding  # noqa: E402
from kdjax.model import ModelConfig  # noqa: E402
from support import scripts_loader  # noqa: E402



def _convert_module():
  return scripts_loader.load("convert")


def _hashes(directory):
  import hashlib
  return {f: hashlib.sha256(open(os.path.join(directory, f), "rb").read()).hexdigest()
          for f in sorted(os.listdir(directory))}


@pytest.mark.slow  # compiles whole training steps (or runs a subprocess): full suite only
def test_hf_to_orbax_to_hf_round_trip(tmp_path):
  convert = _convert_module()
  config = transformers.Qwen3Config(vocab_size=64, hidden_size=32, intermediate_size=40,
                                    num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, head_dim=8)
  model = transformers.AutoModelForCausalLM.from_config(config).eval()
  with torch.no_grad():
    for p in model.parameters():
      p.normal_(0, 0.3)
  src, ckpt, out = (str(tmp_path / n) for n in ("hf", "ckpt", "out"))
  model.save_pretrained(src)
  before = _hashes(src)

  cfg = convert.hf_to_orbax(src, ckpt, "")
  # The checkpoint is a teacher checkpoint as kdjax reads one: config and params.
  saved = ModelConfig.from_dict(checkpoint.saved_config(ckpt)["teacher"])
  assert saved == cfg and cfg.family == "qwen3"
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
  params, _ = experiment.load_params(cfg, ckpt, mesh, sharding.DEFAULT_RULES)
  _, direct = hf.load_pretrained(src)
  jax.tree.map(np.testing.assert_array_equal, params, direct)

  convert.orbax_to_hf(ckpt, out, "teacher", "", src, "")
  assert _hashes(src) == before  # the source is only read
  back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  tokens = torch.tensor(np.random.default_rng(0).integers(0, 64, size=(2, 10)))
  with torch.no_grad():
    np.testing.assert_array_equal(back(tokens).logits.numpy(), model(tokens).logits.numpy())
  with pytest.raises(FileExistsError):
    convert.hf_to_orbax(src, ckpt, "")
