"""Gemma 2 9B distilled into Gemma 2 2B on C4, from the published checkpoints.

The teacher is google/gemma-2-9b, the student starts from google/gemma-2-2b (both base models in
Hugging Face format: config.json, *.safetensors, tokenizer.json), and the student trains on
forward KL to the teacher for 10,000 steps of 64 x 4096 tokens (2.6B tokens). The settings the
three published pairs share, and why the scratch baseline starts from gemma-2-2b too, are in
configs/_hf_distill.py.

  # one host with 8x H100 80GB (about 10 hours at an assumed 40% MFU; not measured)
  python -m kdjax.main --config=configs/gemma2_9b_to_2b.py --workdir=/mnt/runs/gemma2_kd \
      --config.teacher_hf=/models/gemma-2-9b --config.student_init=/models/gemma-2-2b \
      --config.data.tokenizer_path=/models/gemma-2-9b --config.data.data_dir=/mnt/tfds
  # the baseline: same init and batches, cross-entropy only (then --config.mode=eval: the table)
  python -m kdjax.main --config=configs/gemma2_9b_to_2b.py --config.mode=scratch ...
  # a TPU v5p-32 slice (16 chips, 4 hosts): the same command on every host, e.g.
  gcloud compute tpus tpu-vm ssh NAME --worker=all --command="cd kdjax && \
      python -m kdjax.main --config=configs/gemma2_9b_to_2b.py:v5p_32 \
      --workdir=/mnt/shared/runs/gemma2_kd ..."

Presets: '' (8x H100 80GB, one host), 'v5p_32' (TPU v5p-32: 16 chips of 95 GiB, 4 hosts). Both
are FSDP over every device with 2 rows of 4096 tokens per device per micro-batch. On several
hosts the workdir must be one filesystem that every host sees.

Memory per device, in GiB, by each target's own compiler (the columns: configs/_hf_distill.py):

  python scripts/compile_for.py --config=configs/gemma2_9b_to_2b.py
  python scripts/compile_for.py --config=configs/gemma2_9b_to_2b.py:v5p_32

  preset   program            state teacher   temp   peak     of
  ''       distilled           3.65    2.15  12.17  17.98  59.3
  ''       scratch             3.65    0.00  11.23  14.88  59.3
  ''       val (student)       1.22    0.00   3.47   4.69  59.3
  ''       eval (student)      1.22    2.15   5.43   8.80  59.3
  ''       sample (student)    1.22    0.00   1.10   2.32  59.3
  ''       eval (teacher)      2.15    0.00   5.23   9.53  59.3
  ''       sample (teacher)    2.15    0.00   1.99   4.14  59.3
  v5p_32   distilled           1.83    1.08  11.37  14.28  95.0
  v5p_32   scratch             1.83    0.00  10.31  12.14  95.0
  v5p_32   val (student)       0.61    0.00   2.34   2.95  95.0
  v5p_32   eval (student)      0.61    1.08   3.42   5.11  95.0
  v5p_32   sample (student)    0.61    0.00   0.48   1.09  95.0
  v5p_32   eval (teacher)      1.08    0.00   3.45   5.60  95.0
  v5p_32   sample (teacher)    1.08    0.00   1.30   2.38  95.0

Most of 'temp' is attention: Gemma 2's soft-capped attention is not a fused kernel on any
backend, so a layer holds f32 scores of 2 rows x 16 heads x 4096^2 (2 GiB) for the teacher and
half that for the student, a few such arrays at a time. Hence grad accumulation, rather than more
rows per device, makes up the 64-row batch.

Sequence length: at 4096 tokens Gemma 2's 4096-token sliding window never binds, so its local
layers see the whole row, as the global ones do. `--config.data.seq_len=8192` (its trained
context) makes it bind; double grad_accum_steps with it, since the scores grow as the square.

Before the first run: C4 (TFDS 'c4/en' 3.1.0, train and validation) must already be prepared as
ArrayRecord in data.data_dir, e.g. `tfds build c4/en --file_format=array_record
--data_dir=/mnt/tfds` with an Apache Beam runner (it filters Common Crawl; see the TFDS catalog);
kdjax would otherwise try to build it in-process. Gemma's terms must be accepted on Hugging Face
to download the checkpoints. This config was built, sized and compiled for both of its
targets here (scripts/compile_for.py); it has not been run.
"""

import ml_collections

from kdjax import cli

_hf_distill = cli.sibling_config("_hf_distill", __file__)

PRESETS = ("", "v5p_32")


def _gemma2(**sizes):
  """A published Gemma 2 (config.json model_type 'gemma2'); only the sizes differ by model."""
  return _hf_distill.published(
      family="gemma2", vocab_size=256_000, head_dim=256, max_len=8192,
      activation="geglu",  # gelu_pytorch_tanh gates
      norm="rmsnorm", norm_eps=1e-6, norm_plus_one=True,  # RMSNorm scales by (1 + w)
      post_norms=True, embed_scale=True, tie_embeddings=True, rope_theta=10_000.0,
      query_scale=256 ** -0.5,  # query_pre_attn_scalar = 256
      attn_softcap=50.0, logit_softcap=30.0,
      sliding_window=4096, global_every=2,  # layers 0, 2, 4, ... local; 1, 3, 5, ... global
      **sizes)


def get_config(arg=None):
  """Gemma 2 9B -> 2B on C4 (presets '' and 'v5p_32'; see the module docstring for sizing):

    python -m kdjax.main --config=configs/gemma2_9b_to_2b.py --workdir=/mnt/runs/gemma2_kd
  """
  config = _hf_distill.base_config(teacher_hf="/path/to/gemma-2-9b",
                                   student_init="/path/to/gemma-2-2b")
  # 9,241,705,984 and 2,614,341,888 params, as the checkpoints hold them.
  config.teacher = _gemma2(d_model=3584, num_layers=42, num_heads=16, num_kv_heads=8,
                           mlp_dim=14_336)
  config.student = _gemma2(d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4,
                           mlp_dim=9216)
  config.data.vocab_size = 256_000  # the tokenizer's ids: every row of both models
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

  if arg == "v5p_32":
    # 64 rows in 2 micro-batches of 32: again 2 rows per device, on 16 chips.
    config.student_train.grad_accum_steps = 2
    config.distill.loss_chunk_size = 16_384
    config.data.eval_batch_size = 16
    config.target.update(dict(name="TPU v5p-32", devices=16, processes=4, memory_gib=95.0,
                               topology="v5p-32"))
  elif arg not in (None, ""):
    raise ValueError(f"configs/gemma2_9b_to_2b.py: unknown preset {arg!r}; use one of {PRESETS}.")
  return config
