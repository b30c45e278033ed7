"""Qwen2.5 7B distilled into Qwen2.5 1.5B on C4, from the published checkpoints.

The teacher is Qwen/Qwen2.5-7B, the student starts from Qwen/Qwen2.5-1.5B (both base models in
Hugging Face format: config.json, *.safetensors, tokenizer.json), and the student trains on
forward KL to the teacher for 10,000 steps of 64 x 4096 tokens (2.6B tokens). The settings the
three published pairs share, and why the scratch baseline starts from Qwen2.5-1.5B too, are in
configs/_hf_distill.py.

The two share one tokenizer (151,665 ids) but not one vocabulary size: 7B pads its embedding and
output matrices to 152,064 rows, 1.5B to 151,936. No id reaches the padding rows, so the loss and
the evaluation compare the first 151,936 logits of each model, and each model keeps its own size.

  # one host with 8x H100 80GB (about 7 hours at an assumed 40% MFU; not measured)
  python -m kdjax.main --config=configs/qwen25_7b_to_1b5.py --workdir=/mnt/runs/qwen_kd \
      --config.teacher_hf=/models/Qwen2.5-7B --config.student_init=/models/Qwen2.5-1.5B \
      --config.data.tokenizer_path=/models/Qwen2.5-7B --config.data.data_dir=/mnt/tfds
  # the baseline: same init and batches, cross-entropy only (then --config.mode=eval: the table)
  python -m kdjax.main --config=configs/qwen25_7b_to_1b5.py --config.mode=scratch ...
  # a TPU v5e-32 slice (32 chips, 8 hosts): the same command on every host, e.g.
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd kdjax && \
      python -m kdjax.main --config=configs/qwen25_7b_to_1b5.py:v5e_32 \
      --workdir=/mnt/shared/runs/qwen_kd ..."

Presets: '' (8x H100 80GB, one host: FSDP over the 8 GPUs, 2 rows of 4096 tokens per device per
micro-batch), 'v5e_32' (TPU v5e-32: 32 chips of 16 GiB, 8 hosts: tensor-parallel over pairs of
chips, FSDP over the 16 pairs, 1 row per pair per micro-batch). On several hosts the workdir must
be one filesystem that every host sees.

Memory per device, in GiB, by each target's own compiler (the columns: configs/_hf_distill.py):

  python scripts/compile_for.py --config=configs/qwen25_7b_to_1b5.py
  python scripts/compile_for.py --config=configs/qwen25_7b_to_1b5.py:v5e_32

  preset   program            state teacher   temp   peak     of
  ''       distilled           2.16    1.77   9.07  13.00  59.3
  ''       scratch             2.16    0.00   7.73   9.88  59.3
  ''       val (student)       0.72    0.00   1.57   2.29  59.3
  ''       eval (student)      0.72    1.77   3.53   6.03  59.3
  ''       sample (student)    0.72    0.00   0.67   1.39  59.3
  ''       eval (teacher)      1.77    0.00   3.97   7.51  59.3
  ''       sample (teacher)    1.77    0.00   1.66   3.43  59.3
  v5e_32   distilled           0.54    0.44   3.82   4.80  16.0
  v5e_32   scratch             0.54    0.00   2.81   3.35  16.0
  v5e_32   val (student)       0.18    0.00   0.96   1.14  16.0
  v5e_32   eval (student)      0.18    0.44   2.13   2.76  16.0
  v5e_32   sample (student)    0.18    0.00   0.20   0.38  16.0
  v5e_32   eval (teacher)      0.44    0.00   3.11   4.00  16.0
  v5e_32   sample (teacher)    0.44    0.00   0.57   1.01  16.0

Before the first run: C4 (TFDS 'c4/en' 3.1.0, train and validation) must already be prepared as
ArrayRecord in data.data_dir, e.g. `tfds build c4/en --file_format=array_record
--data_dir=/mnt/tfds` with an Apache Beam runner (it filters Common Crawl; see the TFDS catalog);
kdjax would otherwise try to build it in-process. This config was built, sized and compiled for
both of its targets here (scripts/compile_for.py); it has not been run.
"""

import ml_collections

from kdjax import cli

_hf_distill = cli.sibling_config("_hf_distill", __file__)

PRESETS = ("", "v5e_32")

# Shared by both published models (config.json model_type 'qwen2'; use_sliding_window is false).
_QWEN25 = dict(family="qwen2", max_len=131_072, head_dim=128, activation="swiglu",
               norm="rmsnorm", norm_eps=1e-6, rope_theta=1_000_000.0, qkv_bias=True)


def get_config(arg=None):
  """Qwen2.5 7B -> 1.5B (presets '' and 'v5e_32'; see the module docstring):

    python -m kdjax.main --config=configs/qwen25_7b_to_1b5.py --workdir=/mnt/runs/qwen_kd
  """
  config = _hf_distill.base_config(teacher_hf="/path/to/Qwen2.5-7B",
                                   student_init="/path/to/Qwen2.5-1.5B")
  # 7,615,616,512 and 1,543,714,304 params; 7B has its own output matrix, 1.5B ties it.
  config.teacher = _hf_distill.published(
      vocab_size=152_064, d_model=3584, num_layers=28, num_heads=28, num_kv_heads=4,
      mlp_dim=18_944, tie_embeddings=False, **_QWEN25)
  config.student = _hf_distill.published(
      vocab_size=151_936, d_model=1536, num_layers=28, num_heads=12, num_kv_heads=2,
      mlp_dim=8960, tie_embeddings=True, **_QWEN25)
  # The tokenizer's ids (151,643 + 22 special), below both models' padded sizes.
  config.data.vocab_size = 151_665
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

  if arg == "v5e_32":
    # 16 GiB per chip: heads, MLP and vocabulary also split 2 ways (the student's 2 KV heads
    # allow no more), FSDP over the 16 pairs; each pair runs 1 row per micro-batch, 4 of them.
    config.mesh.update(dict(data=1, fsdp=-1, tensor=2))
    config.data.eval_batch_size = 16
    config.target.update(dict(name="TPU v5e-32", devices=32, processes=8, memory_gib=16.0,
                               topology="v5e-32"))
  elif arg not in (None, ""):
    raise ValueError(f"configs/qwen25_7b_to_1b5.py: unknown preset {arg!r}; use one of {PRESETS}.")
  return config
