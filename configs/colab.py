"""Distillation on one Colab runtime: a Colab TPU (v5e-1: one chip, 16 GiB HBM) by default, a Colab
GPU, or the same pipeline at smoke sizes on a CPU. notebooks/tpu_colab.ipynb picks the preset
from JAX's backend; from a shell:

  python -m kdjax.main --config=configs/colab.py --workdir=/content/drive/MyDrive/kdjax/colab_tpu
  python -m kdjax.main --config=configs/colab.py:gpu --workdir=runs/colab_gpu
  python -m kdjax.main --config=configs/colab.py:smoke --workdir=runs/colab_smoke   # ~1 min, CPU

Presets:
  (none)  TPU v5e-1 (Colab's TPU runtime). LM1B (TFDS: downloaded and prepared on a VM's first
          run; the notebook keeps it on the VM's disk and the tokenizer on Drive), a 32768-piece
          tokenizer trained on the first 1M sentences, rows of 512 tokens, 64 per step. Teacher 101M params (d 768, 12 layers, 12 heads over 4 KV heads, SwiGLU
          2048, tied embeddings), student 22M (d 384, 6 layers, 6 over 2, SwiGLU 1024): 4.6x
          smaller. bf16 compute over f32 params, remat of the matmul outputs, the fused loss and
          cross-entropy in chunks of 4096 tokens, the frozen teacher in bf16, the batch over
          every device of the runtime (data parallel), a checkpoint every 250 steps.
  gpu     The same models for a Colab GPU: 32 rows per step in bf16, for an L4 (22.5 GB) or an
          A100 (compute capability 8.0 or newer). A T4 has no bf16: `for_runtime` (which the
          notebook calls) gives it float32 compute and 16 rows, and its own workdir. Neither is
          compiled for its GPU here: kdjax.aot's GPU targets are H100s.
  smoke   Shakespeare at the smoke sizes of configs/shakespeare.py, with this file's settings
          (bf16, chunked losses, the data-parallel mesh): about a minute on a 2-core CPU. The
          tests run the notebook with it.

Every program of the TPU preset, compiled for one v5e chip by libtpu on a CPU machine (no TPU;
`pytest -m targets` compiles it again), GiB per device:

  python scripts/compile_for.py --config=configs/colab.py

  TPU v5e-1 (v5e-1: 1 devices of 16.0 GiB), mesh {'data': 1, 'fsdp': 1, 'tensor': 1}
  phase              state teacher   batch    temp    peak    of    free  TFLOP/step  t@100%
  teacher             1.13    0.00    0.00    9.29   10.42  16.0    5.58        21.6   0.11s
  distilled           0.25    0.19    0.00    4.40    4.83  16.0   11.17        12.0   0.06s
  scratch             0.25    0.00    0.00    3.59    3.84  16.0   12.16         4.8   0.02s
  val (teacher)       0.38    0.00    0.00    1.10    1.47  16.0   14.53         7.2   0.04s
  val (student)       0.08    0.00    0.00    1.05    1.13  16.0   14.87         1.6   0.01s
  eval (student)      0.08    0.19    0.00    1.65    1.92  16.0   14.08         8.8   0.04s
  sample (student)    0.08    0.00    0.00    0.00    0.14  16.0   15.86           -
  eval (teacher)      0.19    0.00    0.00    1.69    2.07  16.0   13.93        14.4   0.07s
  sample (teacher)    0.19    0.00    0.00    0.16    0.34  16.0   15.66           -

The compiler's peak is 10.4 GiB of the chip's 16 (the teacher's step). TFLOP/step is kdjax.flops'
count for the compiled step (XLA counts a scanned layer once). Expected step times at 40% MFU of
v5e's 197 bf16 TFLOP/s (an assumption, not a measurement: no TPU was at hand): teacher
0.27 s (4000 steps: 18 min), distilled 0.15 s (10 min), scratch 0.06 s (4 min), so about 35
minutes of training, plus a compile per program and LM1B's preparation on a new VM.
"""

from kdjax import cli

lm1b = cli.sibling_config("lm1b", __file__)
shakespeare = cli.sibling_config("shakespeare", __file__)

PRESETS = ("", "gpu", "smoke")


def get_config(arg=None):
  """A Colab runtime's distillation; `arg` is '' (TPU v5e-1), 'gpu' or 'smoke' (CPU):

    python -m kdjax.main --config=configs/colab.py --workdir=/content/drive/MyDrive/kdjax/colab_tpu
  """
  if arg not in (None, *PRESETS):
    raise ValueError(f"configs/colab.py: unknown preset {arg!r}; use one of {PRESETS}.")
  if arg == "smoke":
    config = shakespeare.get_config("smoke")
    _colab_settings(config, chunk_tokens=128)
    config.target.update(dict(name="CPU (smoke sizes)", devices=1, processes=1,
                               memory_gib=8.0, topology=""))
    return config
  # LM1B's data settings and bf16 model settings (configs/lm1b.py), resized for one chip.
  config = lm1b.get_config()
  config.data.update(dict(batch_size=64, eval_batch_size=64, eval_batches=32, val_batches=8,
                          num_shards=1, tokenizer_max_documents=1_000_000))
  config.data.vocab_size = 32768  # one FieldReference: the models follow
  config.data.seq_len = 512
  config.teacher.update(dict(d_model=768, num_layers=12, num_heads=12, num_kv_heads=4,
                             mlp_dim=2048, max_len=512))
  config.student.update(dict(d_model=384, num_layers=6, num_heads=6, num_kv_heads=2,
                             mlp_dim=1024, max_len=512))
  config.teacher_train.update(dict(steps=4000, learning_rate=6e-4, warmup_steps=200))
  config.student_train.update(dict(steps=4000, learning_rate=1e-3, warmup_steps=200))
  # One device: the frozen teacher keeps the default rules (replicated over data parallelism).
  config.frozen_teacher.sharding_rules = []
  _colab_settings(config, chunk_tokens=4096)
  config.target.update(dict(name="Colab TPU v5e-1", devices=1, processes=1, memory_gib=16.0,
                             topology="v5e-1"))
  if arg == "gpu":
    config.data.update(dict(batch_size=32, eval_batch_size=32))
    # A T4 has 15 GiB; an L4 22.5. No compile target: XLA's GPU configs here are H100s.
    config.target.update(dict(name="Colab GPU (T4 or L4)", memory_gib=15.0, topology=""))
  return config


def for_runtime(backend: str, compute_capability: str | None = None):
  """(run name, config) for the runtime JAX found: the preset by backend ('tpu' -> '', 'gpu' ->
  'gpu', anything else -> 'smoke'); on a GPU of compute capability below 8.0 (a T4: no bf16)
  float32 compute and 16 rows per step, under a run name of its own, so that its checkpoints never
  mix with a bf16 run's. A capability that is not a number (ROCm's 'gfx90a') keeps bf16.
  """
  preset = {"tpu": "", "gpu": "gpu"}.get(backend, "smoke")
  config = get_config(preset)
  name = f"colab_{preset or 'tpu'}"
  try:
    no_bf16 = backend == "gpu" and float(compute_capability) < 8.0
  except (TypeError, ValueError):
    no_bf16 = False
  if no_bf16:
    for model in (config.teacher, config.student, config.frozen_teacher):
      model.dtype = "float32"
    config.data.update(dict(batch_size=16, eval_batch_size=16))
    name += "_float32"
  return name, config


def _colab_settings(config, chunk_tokens: int):
  """What every preset shares: bf16 compute, chunked losses, the batch over all devices, frequent
  checkpoints (a runtime can be taken away at any time)."""
  for model in (config.teacher, config.student):
    model.dtype = "bfloat16"
  config.frozen_teacher.update(dict(dtype="bfloat16", param_dtype="bfloat16"))
  config.distill.loss_chunk_size = chunk_tokens
  config.teacher_train.loss_chunk_size = chunk_tokens
  config.student_train.loss_chunk_size = chunk_tokens
  config.data.eval_chunk_size = chunk_tokens
  config.mesh.update(dict(data=-1, fsdp=1, tensor=1))
  if config.data.name != "shakespeare":
    config.log_every = 50
    config.checkpoint_every = 250
    config.keep_checkpoints = 2
  config.progress_bar = False  # the notebook shows curves; tqdm bars clutter a cell's output
