"""Llama 3.1 8B distilled into Llama 3.2 1B on C4, from the published checkpoints.

The teacher is meta-llama/Llama-3.1-8B, the student starts from meta-llama/Llama-3.2-1B (both base
models in Hugging Face format: config.json, *.safetensors, tokenizer.json); Llama 3.2 1B was
itself pretrained on logits of Llama 3.1 8B and 70B, so this continues its own recipe. The student
trains on forward KL to the teacher for 10,000 steps of 64 x 4096 tokens (2.6B tokens). The
settings the three published pairs share, and why the scratch baseline starts from Llama-3.2-1B
too, are in configs/_hf_distill.py.

  # one host with 8x H100 80GB (about 7 hours at an assumed 40% MFU; not measured)
  python -m kdjax.main --config=configs/llama31_8b_to_llama32_1b.py --workdir=/mnt/runs/llama_kd \
      --config.teacher_hf=/models/Llama-3.1-8B --config.student_init=/models/Llama-3.2-1B \
      --config.data.tokenizer_path=/models/Llama-3.1-8B --config.data.data_dir=/mnt/tfds
  # the baseline: same init and batches, cross-entropy only (then --config.mode=eval: the table)
  python -m kdjax.main --config=configs/llama31_8b_to_llama32_1b.py --config.mode=scratch ...
  # a TPU v5e-64 slice (64 chips, 16 hosts): the same command on every host, e.g.
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd kdjax && \
      python -m kdjax.main --config=configs/llama31_8b_to_llama32_1b.py:v5e_64 \
      --workdir=/mnt/shared/runs/llama_kd ..."

Presets: '' (8x H100 80GB, one host: FSDP over the 8 GPUs, 2 rows of 4096 tokens per device per
micro-batch), 'v5e_64' (TPU v5e-64: 64 chips of 16 GiB, 16 hosts: tensor-parallel over each
host's 4 chips, FSDP over the 16 hosts, 1 row per group of 4 per micro-batch). On several hosts
the workdir must be one filesystem that every host sees.

Memory per device, in GiB, by each target's own compiler (the columns: configs/_hf_distill.py):

  python scripts/compile_for.py --config=configs/llama31_8b_to_llama32_1b.py
  python scripts/compile_for.py --config=configs/llama31_8b_to_llama32_1b.py:v5e_64

  preset   program            state teacher   temp   peak     of
  ''       distilled           1.73    1.87  15.67  19.27  59.3
  ''       scratch             1.73    0.00  14.98  16.71  59.3
  ''       val (student)       0.58    0.00   3.24   3.81  59.3
  ''       eval (student)      0.58    1.87   3.95   6.40  59.3
  ''       sample (student)    0.58    0.00   0.53   1.10  59.3
  ''       eval (teacher)      1.87    0.00   4.31   8.05  59.3
  ''       sample (teacher)    1.87    0.00   1.77   3.64  59.3
  v5e_64   distilled           0.22    0.23   3.25   3.70  16.0
  v5e_64   scratch             0.22    0.00   2.42   2.64  16.0
  v5e_64   val (student)       0.07    0.00   1.02   1.09  16.0
  v5e_64   eval (student)      0.07    0.23   2.01   2.32  16.0
  v5e_64   sample (student)    0.07    0.00   0.12   0.20  16.0
  v5e_64   eval (teacher)      0.23    0.00   2.97   3.44  16.0
  v5e_64   sample (teacher)    0.23    0.00   0.32   0.56  16.0

Before the first run: C4 (TFDS 'c4/en' 3.1.0, train and validation) must already be prepared as
ArrayRecord in data.data_dir, e.g. `tfds build c4/en --file_format=array_record
--data_dir=/mnt/tfds` with an Apache Beam runner (it filters Common Crawl; see the TFDS catalog);
kdjax would otherwise try to build it in-process. Llama's license must be accepted on Hugging Face
to download the checkpoints. This config was built, sized and compiled for both of its
targets here (scripts/compile_for.py); it has not been run.
"""

import ml_collections

from kdjax import cli

_hf_distill = cli.sibling_config("_hf_distill", __file__)

PRESETS = ("", "v5e_64")

# Shared by both published models (config.json model_type 'llama'): vocabulary, RoPE base and
# Llama 3's RoPE frequency scaling from 8192 trained positions to a 131072-token context.
_LLAMA3 = dict(family="llama", vocab_size=128_256, max_len=131_072, activation="swiglu",
               norm="rmsnorm", norm_eps=1e-5, rope_theta=500_000.0, rope_low_freq_factor=1.0,
               rope_high_freq_factor=4.0, rope_original_max_len=8192)


def get_config(arg=None):
  """Llama 3.1 8B -> Llama 3.2 1B (presets '' and 'v5e_64'; see the module docstring):

    python -m kdjax.main --config=configs/llama31_8b_to_llama32_1b.py --workdir=/mnt/runs/llama_kd
  """
  config = _hf_distill.base_config(teacher_hf="/path/to/Llama-3.1-8B",
                                   student_init="/path/to/Llama-3.2-1B")
  # 8,030,261,248 and 1,235,814,400 params; 3.1 8B has its own output matrix, 3.2 1B ties it.
  config.teacher = _hf_distill.published(
      d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, mlp_dim=14_336,
      tie_embeddings=False, rope_scaling=8.0, **_LLAMA3)
  config.student = _hf_distill.published(
      d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64, mlp_dim=8192,
      tie_embeddings=True, rope_scaling=32.0, **_LLAMA3)
  config.data.vocab_size = 128_256  # the tokenizer's ids (128000 + 256 special): every row
  # 16 data streams: any process count dividing 16 sees the same batches.
  config.data.update(dict(batch_size=64, eval_batch_size=8, eval_batches=64, val_batches=16,
                          num_shards=16))
  # 64 rows in 4 micro-batches of 16: 2 rows per device on 8 devices.
  config.student_train.update(_hf_distill.train_settings(steps=10_000, learning_rate=1e-5,
                                                         grad_accum_steps=4))
  # Chunks of 8192 tokens of a 16-row micro-batch: 512 positions per row, 1024 tokens per device.
  config.distill.loss_chunk_size = 8192
  config.target = ml_collections.ConfigDict(dict(name="8x NVIDIA H100 80GB", devices=8,
                                                 processes=1, memory_gib=80.0,
                                                 topology="h100x8"))

  if arg == "v5e_64":
    # 16 GiB per chip: heads, MLP and vocabulary also split 4 ways (the 4 chips of a host),
    # FSDP over the 16 groups of 4; each group runs 1 row per micro-batch, 4 micro-batches.
    config.mesh.update(dict(data=1, fsdp=-1, tensor=4))
    config.data.eval_batch_size = 16
    config.target.update(dict(name="TPU v5e-64", devices=64, processes=16, memory_gib=16.0,
                               topology="v5e-64"))
  elif arg not in (None, ""):
    raise ValueError(f"configs/llama31_8b_to_llama32_1b.py: unknown preset {arg!r}; "
                     f"use one of {PRESETS}.")
  return config
