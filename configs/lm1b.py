"""A 1.0B-param teacher and a 169M-param student on LM1B, sized for accelerator clusters.

The same experiment as configs/shakespeare.py (teacher -> distilled -> scratch -> table) at a
scale that needs sharding: the teacher trains FSDP-sharded with bf16 compute, and during
distillation is kept in bf16, FSDP-sharded over every device. Each preset declares the hardware it
targets (config.target); scripts/compile_for.py compiles every program of the run for it with
that hardware's own compiler, from a CPU machine.

  # one 8-GPU host
  python -m kdjax.main --config=configs/lm1b.py --workdir=/mnt/shared/runs/lm1b
  # a TPU v5e-32 slice (8 hosts): the same command on every host, e.g.
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd kdjax && \\
      python -m kdjax.main --config=configs/lm1b.py:v5e_32 --workdir=/mnt/shared/runs/lm1b"

Presets: '' (8x H100 80GB, one host), 'v5e_32' (TPU v5e-32: 32 chips of 16 GiB, 8 hosts).
On several hosts the workdir must be one filesystem that every host sees (checkpoints are
written by all of them).

Memory per device, in GiB, by each target's own compiler (XLA:GPU without cuDNN, so attention is
XLA's, an upper bound; libtpu): 'state' is the model's f32 params (+ Adam moments when it trains),
'teacher' the frozen bf16 teacher, 'temp' what the compiler adds, 'peak' all of it at once,
'of' what a device offers (on GPU JAX's default share, 75%).
Remat 'dots_no_batch' keeps the weight matmuls' outputs and recomputes attention ('dots' kept
every layer's f32 scores: the teacher step needed 108 GiB per H100 and was refused on v5e), and
the cross-entropy and evaluation run chunked (no [B, L, V] logits).

  python scripts/compile_for.py --config=configs/lm1b.py
  python scripts/compile_for.py --config=configs/lm1b.py:v5e_32

  preset   program            state teacher   temp   peak     of
  ''       teacher             1.41    0.00  32.42  33.83  59.3
  ''       distilled           0.24    0.24  13.89  14.36  59.3
  ''       scratch             0.24    0.00  13.89  14.12  59.3
  ''       val (teacher)       0.47    0.00   0.99   1.46  59.3
  ''       val (student)       0.08    0.00   0.82   0.90  59.3
  ''       eval (student)      0.08    0.24   0.96   1.27  59.3
  ''       sample (student)    0.08    0.00   0.07   0.15  59.3
  ''       eval (teacher)      0.24    0.00   1.05   1.52  59.3
  ''       sample (teacher)    0.24    0.00   0.23   0.47  59.3
  v5e_32   teacher             1.41    0.00   9.50  10.91  16.0
  v5e_32   distilled           0.24    0.06   3.89   4.19  16.0
  v5e_32   scratch             0.24    0.00   3.86   4.09  16.0
  v5e_32   val (teacher)       0.47    0.00   0.52   0.99  16.0
  v5e_32   val (student)       0.08    0.00   0.14   0.21  16.0
  v5e_32   eval (student)      0.08    0.06   0.27   0.41  16.0
  v5e_32   sample (student)    0.08    0.00   0.05   0.15  16.0
  v5e_32   eval (teacher)      0.06    0.00   0.26   0.38  16.0
  v5e_32   sample (teacher)    0.06    0.00   0.01   0.15  16.0

The first run downloads and prepares LM1B through TFDS (about 1.7 GB) into data.data_dir; kdjax
has not been run end to end on this config (it is far too large for CPU), only built, sized and
compiled for both targets.
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
                             remat_policy="dots_no_batch"))
  config.student.update(dict(d_model=1024, num_layers=12, num_heads=16, num_kv_heads=4,
                             mlp_dim=2816, max_len=2048, dtype="bfloat16",
                             remat_policy="dots_no_batch"))
  config.teacher_train.update(dict(steps=20_000, learning_rate=3e-4, warmup_steps=1000))
  config.student_train.update(dict(steps=10_000, learning_rate=6e-4, warmup_steps=500))
  # 32 per-device rows x 1024 tokens x 32768 vocab would be 4 GiB of f32 logits per model: the
  # fused loss in chunks of 1024 tokens never holds them.
  config.distill.loss_chunk_size = 1024
  # The same for the cross-entropy of the teacher and scratch phases and for evaluation: chunks
  # of 8192 tokens (1024 per device on 8).
  config.teacher_train.loss_chunk_size = 8192
  config.student_train.loss_chunk_size = 8192
  config.data.eval_chunk_size = 8192
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
                                                 processes=1, memory_gib=80.0,
                                                 topology="h100x8"))

  if arg == "v5e_32":
    config.mesh.update(dict(data=4, fsdp=8, tensor=1))
    config.target.update(dict(name="TPU v5e-32", devices=32, processes=8, memory_gib=16.0,
                               topology="v5e-32"))
  elif arg not in (None, ""):
    raise ValueError(f"configs/lm1b.py: unknown preset {arg!r}; use one of {PRESETS}.")
  return config
