"""What the configs that distill one published Hugging Face model into another share.

gemma2_9b_to_2b.py, llama31_8b_to_llama32_1b.py and qwen25_7b_to_1b5.py start from `base_config`
and set the two architectures (with `published`: the values of each model's config.json), the
batch geometry and their hardware presets. Shared by all three:

- mode 'distill': the teacher is config.teacher_hf, already trained, so there is no teacher phase;
  the student starts from the published small model (config.student_init), not from random init.
- data: C4 (TFDS 'c4/en', train / validation), tokenized with the teacher's own tokenizer.
- loss: forward KL at T = 1 alone (alpha = 1), the logit distillation that trained Gemma 2's
  small models, Llama 3.2 1B and the Minitron models; cross-entropy is still computed and logged
  as 'hard_loss'. It runs fused and chunked: one micro-batch's [B, L, V] logits would be tens of
  GiB per device at these vocabularies (128K-256K entries).
- numerics: bf16 compute, f32 params and Adam moments for the student (12 bytes/param); the
  frozen teacher in bf16 (2 bytes/param), FSDP-sharded over every device, never in the optimizer.
- remat 'full': only each layer's input is kept for the backward pass. 'dots' would also keep
  every layer's attention scores (XLA's attention and Gemma 2's soft-capped one are plain
  matmuls), 2 GiB per layer at 2 rows of 4096 tokens.
- memory: each config's docstring gives what one device holds in each program it runs, as the
  target's own compiler reports it (scripts/compile_for.py: XLA:GPU for the H100s, built with no
  cuDNN, so attention is XLA's and an upper bound; libtpu for TPU). 'state' is the model's f32
  params (+ Adam moments when it trains), 'teacher' the frozen bf16 teacher, 'temp' what the
  compiler adds (activations, gradients, gathered weights, loss chunks), 'peak' all of it at
  once, 'of' what one device offers (a TPU's HBM; on GPU the share JAX takes by default,
  XLA_PYTHON_CLIENT_MEM_FRACTION = 0.75 of an H100's 79.1 GiB). No program holds [B, L, V]
  logits: the distillation loss, the scratch baseline's cross-entropy
  (student_train.loss_chunk_size) and evaluation and validation (data.eval_chunk_size) all run
  from final hidden states in chunks of tokens.

The scratch comparison (mode 'scratch') is the same student from the same published init on the
same batches with cross-entropy alone: continued pretraining on C4 without the teacher. That
isolates what the teacher adds; a randomly initialised student would need trillions of tokens to
be comparable and says nothing about distillation at this budget.
"""

import ml_collections

from kdjax import cli, settings

shakespeare = cli.sibling_config("shakespeare", __file__)


def published(**fields) -> ml_collections.ConfigDict:
  """Every model field, set to a published architecture's values.

  Compute runs in bf16 with f32 params (the student's master weights; the frozen teacher is cast
  to bf16 by config.frozen_teacher). Fields not given keep kdjax.model.ModelConfig's defaults,
  the plain Llama-style choices (no biases, no soft-caps, pre-norm only).
  """
  numerics = dict(dtype="bfloat16", param_dtype="float32", remat_policy="full")
  return settings.model_section(**{**numerics, **fields})


def base_config(*, teacher_hf: str, student_init: str) -> ml_collections.ConfigDict:
  """shakespeare.py's fields, with the settings the three Hugging Face pairs share."""
  config = shakespeare.get_config()
  config.mode = "distill"
  config.teacher_hf = teacher_hf
  config.student_init = student_init
  config.data.update(dict(
      name="c4/en",
      # C4's validation split (364,608 documents) gives both held-out sets.
      eval_split="validation[50%:]", val_split="validation[:50%]",
      tokenizer_path=teacher_hf,  # the teacher's tokenizer.json / tokenizer.model
  ))
  config.data.seq_len = 4096
  config.distill.alpha = 1.0  # forward KL at T = 1 (the defaults) alone
  # No [B, L, V] logits anywhere: the scratch baseline's cross-entropy and evaluation run from
  # final hidden states in chunks of 8192 tokens too (the distillation loss's chunk is per config).
  config.student_train.loss_chunk_size = 8192
  config.data.eval_chunk_size = 8192
  config.frozen_teacher.update(dict(
      dtype="bfloat16", param_dtype="bfloat16",
      sharding_rules=[["batch", ["data", "fsdp"]], ["embed", ["data", "fsdp"]],
                      ["vocab", "tensor"], ["heads", "tensor"], ["kv_heads", "tensor"],
                      ["mlp", "tensor"]]))
  config.mesh.update(dict(data=1, fsdp=-1))
  config.log_every = 20
  config.checkpoint_every = 500
  config.keep_checkpoints = 3
  config.progress_bar = False
  config.sample_prompts = ["The history of the city", "To make a good bread,",
                           "The results of the study"]
  return config


def train_settings(*, steps: int, learning_rate: float, grad_accum_steps: int):
  """The student's optimizer settings for continued training from a published checkpoint:
  a short warmup (2% of the steps), cosine decay to a tenth, and no weight decay, which would
  only pull trained weights towards zero. The rest are kdjax.settings.TrainSettings' defaults."""
  return dict(steps=steps, learning_rate=learning_rate, warmup_steps=max(1, steps // 50),
              weight_decay=0.0, grad_accum_steps=grad_accum_steps)
