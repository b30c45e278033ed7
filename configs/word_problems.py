"""Task distillation on arithmetic word problems, end to end on a laptop CPU (kdjax.task).

A stand-in for "I use a big model for one job; give me a small one that does it nearly as well":

  (a) a teacher trained on a large labelled set, standing in for a big model that already knows
      the task;
  (b) the user has a small labelled set and a larger set of unlabelled prompts, which the
      teacher answers (recording its top-k log-probs at every answer token);
  (c) the same student trained four ways, same init, steps and batch size: the small labelled
      set only (no teacher), the teacher's answers, the answers and logits, and the answers and
      logits mixed with the labelled set;
  (d) held-out exact match, agreement with the teacher, error copying, params and decode speed.

The problems are generated in code (kdjax.data.word_problems): ten templates over +, -, x and a
two-step +/-, e.g. "How many cookies did you sell if you sold 32 chocolate cookies and 27 vanilla
cookies?" -> "32 + 27 = 59. The answer is 59."; train and held-out splits by template and
numbers, so held-out problems are unseen; digits are tokenized one by one.

  python -m kdjax.main --config=configs/word_problems.py --workdir=runs/word_problems
  python -m kdjax.main --config=configs/word_problems.py:smoke --workdir=runs/wp_smoke

Presets: (none) the default run (README has the measured table and wall time); smoke, the same
pipeline shrunk for the tests. Steps come from the wall-time budget (15 minutes on a 2-core
CPU), not from the held-out problems: on a 2-core Xeon a teacher step takes about 0.27 s and a
student step about 0.075 s, and the answers, scoring and speed runs about 1.5 minutes; the
teacher gets 1000 steps (4.5 minutes) and each of the four students 1800 (2.3 minutes), the
students' share raised from a first cut (teacher 1100, students 1200 and then 1500) whose
students' held-out loss was still falling at the end (README has the tables).
Both models' layers are unrolled (`scan_layers=False`): at two and four layers, the scanned
step's per-layer stacking of weights, activations and gradients costs more than the loop saves
(student step 76 -> 61 ms, teacher 253 -> 235 ms here).
"""

import ml_collections

from kdjax import cli, settings

shakespeare = cli.sibling_config("shakespeare", __file__)

PRESETS = ("", "smoke")


def get_config(arg=None):
  """The word-problems task experiment; `arg` is one of PRESETS.

    python -m kdjax.main --config=configs/word_problems.py --workdir=runs/word_problems
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.mode = "experiment"  # or 'eval': score the workdir's checkpoints again

  vocab = ml_collections.FieldReference(384)
  config.data = settings.config_section(settings.DataSettings, vocab_size=vocab, seq_len=128,
                                        batch_size=16, eval_batch_size=32, val_batches=4,
                                        split_digits=True)
  config.task = settings.config_section(settings.TaskSettings, generate="word_problems",
                                        extractor="after_marker", max_new_tokens=40,
                                        answer_batch_size=256, record_topk=16, mix_weight=0.25,
                                        speed_batch_sizes=(1, 64), speed_runs=5)
  # kdjax.data.word_problems.make_splits: records per split, its seed and number ranges.
  config.task_data = ml_collections.ConfigDict(dict(
      sizes=dict(teacher=20000, labelled=200, prompts=4000, val=150, test=300), seed=0,
      ranges=dict(max_operand=12, max_multiplier=9, max_multiplicand=9)))

  config.teacher = settings.model_section(vocab_size=vocab, d_model=128, num_layers=4,
                                          num_heads=4, num_kv_heads=4, mlp_dim=384, max_len=256,
                                          scan_layers=False)
  config.student = settings.model_section(vocab_size=vocab, d_model=64, num_layers=2,
                                          num_heads=4, num_kv_heads=2, mlp_dim=192, max_len=256,
                                          scan_layers=False)
  config.teacher_train = settings.config_section(settings.TrainSettings, steps=1000,
                                                 learning_rate=3e-3, warmup_steps=100)
  config.student_train = settings.config_section(settings.TrainSettings, steps=1800,
                                                 learning_rate=3e-3, warmup_steps=100)
  # The logits students' soft loss against the teacher's recorded top-k (no teacher in their
  # step): forward KL through the 'topk_residual' estimator, alpha = 0.5, T = 1.
  config.distill = settings.distill_section(alpha=0.5, cache_estimator="topk_residual")
  # How runs start, are placed, checkpointed and logged: as in the Shakespeare experiment
  # (configs/shakespeare.py says what each field does).
  base = shakespeare.get_config()
  for key in ("teacher_checkpoint", "teacher_hf", "student_init", "student_quant",
              "student_lora", "frozen_teacher", "mesh",
              "sharding_rules", "target", "checkpoint_every", "keep_checkpoints",
              "nonfinite_patience", "progress_bar", "wandb"):
    config[key] = base[key]
  config.log_every = 20
  # The task's own report replaces the Shakespeare run's sampled lines.
  config.num_samples = 0
  config.sample_prompts = [""]
  config.sample_tokens = 0
  config.sample_temperature = 0.0
  config.sample_top_k = 0
  if arg not in (None, "") and arg not in PRESETS:
    raise ValueError(f"configs/word_problems.py: unknown preset {arg!r}; use one of {PRESETS}.")
  return _smoke(config) if arg == "smoke" else config


def _smoke(config):
  config.task_data.sizes = dict(teacher=400, labelled=40, prompts=64, val=32, test=32)
  config.task.update(max_new_tokens=24, answer_batch_size=32, record_topk=4,
                     speed_batch_sizes=(1, 8), speed_runs=1)
  config.data.update(batch_size=8, eval_batch_size=8, val_batches=2, seq_len=64)
  config.teacher.update(d_model=32, num_layers=2, num_heads=2, num_kv_heads=2, mlp_dim=64)
  config.student.update(d_model=16, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=32)
  config.teacher_train.update(steps=20, warmup_steps=2)
  config.student_train.update(steps=10, warmup_steps=2)
  config.log_every = 5
  config.checkpoint_every = 10
  config.progress_bar = False
  return config
