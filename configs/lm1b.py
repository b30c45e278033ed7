"""A 1.0B-param teacher and a 169M-param student on LM1B, sized for accelerator clusters.

The same experiment as configs/shakespeare.py (teacher -> distilled -> scratch -> table) at a
scale that needs sharding: the teacher trains FSDP-sharded with bf16 compute, and during
distillation is kept in bf16, FSDP-sharded over every device. Each preset declares the hardware it
targets; tests/test_configs.py builds the whole step for that hardware under jax.eval_shape and
checks that params, optimizer state and teacher fit one device's memory.

  # one 8-GPU host
  python -m kdjax.main --config=configs/lm1b.py --workdir=/mnt/shared/runs/lm1b
  # a TPU v5e-32 slice (8 hosts): the same command on every host, e.g.
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd kdjax && \\
      python -m kdjax.main --config=configs/lm1b.py:v5e_32 --workdir=/mnt/shared/runs/lm1b"

Presets: '' (8x H100 80GB, one host), 'v5e_32' (TPU v5e-32: 32 chips of 16 GiB, 8 hosts).
On several hosts the workdir must be one filesystem that every host sees (checkpoints are
written by all of them).
The first run downloads and prepares LM1B through TFDS (about 1.7 GB) into data.data_dir; kdjax
has not been run end to end on this config on CPU (it is far too large), only built and sized.
"""

import ml_collections

from kdjax import cli

shakespeare = cli.sibling_config("shakespeare", __file__)

PRESETS = ("", "v5e_32")


def get_config(arg=None):
  """LM1B on 8 GPUs (default) or a v5e-32 slice ('v5e_32'); see the module docstring:

    python -m kdjax.main --config=configs/lm1b.py --workdir=/mnt/shared/runs/lm1b
  """
  # The Shakespeare config gives every field; this file changes sizes, data and placement.
  config = shakespeare.get_config()
  config.data.update(dict(
      name="lm1b", eval_split="test[5%:]", val_split="test[:5%]",  # LM1B has no validation split
      tokenizer_max_documents=2_000_000, batch_size=256, eval_batch_size=64,
      eval_batches=64, val_batches=16,
      num_shards=32,  # any process count dividing 32 sees the same batches
  ))
  config.data.vocab_size = 32768  # one FieldReference: the models follow
  config.data.seq_len = 1024
  config.teacher.update(dict(d_model=2048, num_layers=20, num_heads=16, num_kv_heads=8,
                             mlp_dim=5632, max_len=2048, dtype="bfloat16",
                             remat_policy="dots"))
  config.student.update(dict(d_model=1024, num_layers=12, num_heads=16, num_kv_heads=4,
                             mlp_dim=2816, max_len=2048, dtype="bfloat16",
                             remat_policy="dots"))
  config.teacher_train.update(dict(steps=20_000, learning_rate=3e-4, warmup_steps=1000))
  config.student_train.update(dict(steps=10_000, learning_rate=6e-4, warmup_steps=500))
  # 32 per-device rows x 1024 tokens x 32768 vocab would be 4 GiB of f32 logits per model: the
  # fused loss in chunks of 1024 tokens never holds them.
  config.distill.loss_chunk_size = 1024
  # The frozen teacher: bf16 params (half the memory), 'embed' dims over data x fsdp.
  config.frozen_teacher.update(dict(
      dtype="bfloat16", param_dtype="bfloat16",
      sharding_rules=[["batch", ["data", "fsdp"]], ["embed", ["data", "fsdp"]],
                      ["vocab", "tensor"], ["heads", "tensor"], ["kv_heads", "tensor"],
                      ["mlp", "tensor"]]))
  config.mesh.update(dict(data=1, fsdp=-1))
  config.log_every = 50
  config.checkpoint_every = 1000
  config.keep_checkpoints = 3
  config.progress_bar = False
  config.sample_prompts = ["The company said", "In the first half of", "Scientists have"]
  config.target = ml_collections.ConfigDict(dict(name="8x NVIDIA H100 80GB", devices=8,
                                                 processes=1, memory_gib=80.0))

  if arg == "v5e_32":
    config.mesh.update(dict(data=4, fsdp=8, tensor=1))
    config.target.update(dict(name="TPU v5e-32", devices=32, processes=8, memory_gib=16.0))
  elif arg not in (None, ""):
    raise ValueError(f"configs/lm1b.py: unknown preset {arg!r}; use one of {PRESETS}.")
  return config
