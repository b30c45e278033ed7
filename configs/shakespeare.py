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

from kdjax import settings
from kdjax.sharding import DEFAULT_RULES

PRESETS = ("", "smoke", "ablate", "ablate_smoke")


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
  """The Shakespeare experiment; `arg` is one of PRESETS (the module docstring lists them):

    python -m kdjax.main --config=configs/shakespeare.py --workdir=runs/shakespeare  # ~12 min
    python -m kdjax.main --config=configs/shakespeare.py:smoke --workdir=runs/smoke  # ~30 s
  """
  config = ml_collections.ConfigDict()
  config.seed = 0
  # 'experiment': teacher -> distilled -> scratch -> eval table. 'teacher', 'distill', 'scratch'
  # run one phase; 'eval' evaluates the phases found in the workdir.
  config.mode = "experiment"

  vocab = ml_collections.FieldReference(4096)
  seq_len = ml_collections.FieldReference(128)

  # Every section starts from its defaults in kdjax/settings.py (kdjax.model.ModelConfig for the
  # models), which say what each field means; only the values that differ are given here.
  config.data = settings.config_section(settings.DataSettings, vocab_size=vocab, seq_len=seq_len)

  # 2.56M-param teacher, 0.60M-param student (4.3x smaller); the tied 4096-token embedding is
  # 31% of the teacher and 66% of the student.
  config.teacher = settings.model_section(vocab_size=vocab, d_model=192, num_layers=4, num_heads=6,
                                          num_kv_heads=6, mlp_dim=512, max_len=512)
  config.student = settings.model_section(vocab_size=vocab, d_model=96, num_layers=2, num_heads=4,
                                          num_kv_heads=2, mlp_dim=256, max_len=512)
  config.teacher_train = settings.config_section(settings.TrainSettings, steps=600,
                                                 learning_rate=3e-3, warmup_steps=50)
  config.student_train = settings.config_section(settings.TrainSettings, steps=250,
                                                 learning_rate=3e-3, warmup_steps=25)
  # A given teacher instead of training one, and the students' init (settings.ModelSources):
  # a teacher phase's checkpoints folder, or a Hugging Face model directory that fits
  # config.teacher; a Hugging Face model directory that fits config.student. '' = none.
  config.teacher_checkpoint = ""
  config.teacher_hf = ""
  config.student_init = ""
  # A quantized or LoRA student (kdjax.model.QuantConfig / LoraConfig, through Qwix), both off:
  # --config.student_quant.weight=int4 trains with fake-quantized int4 weights and evaluates the
  # really quantized model; --config.student_lora.rank=8 trains adapters on config.student_init.
  settings.student_sections(config)

  # The loss (settings.DistillSettings): forward KL at T = 1, alpha = 0.5; feature terms,
  # schedules, a teacher cache, on-policy and sequence-level data are all off by default, e.g.
  # --config.distill.temperature_schedule.kind=linear --config.distill.temperature_schedule.end=1
  config.distill = settings.distill_section()

  # How the frozen teacher runs during distillation and evaluation: '' keeps config.teacher's
  # dtypes; e.g. param_dtype='bfloat16' halves its memory. Empty sharding_rules = sharding_rules.
  config.frozen_teacher = ml_collections.ConfigDict(dict(dtype="", param_dtype="",
                                                         sharding_rules=[]))

  # data x fsdp x tensor devices; -1 = all remaining devices.
  config.mesh = settings.config_section(settings.MeshSettings)
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

  presets = {"smoke": _smoke, "ablate": _ablate, "ablate_smoke": _ablate_smoke}
  if arg not in (None, "") and arg not in presets:
    raise ValueError(f"configs/shakespeare.py: unknown preset {arg!r}; use one of {PRESETS}.")
  return presets[arg](config) if arg else config


def _smoke(config):
  config.data.update(dict(batch_size=8, eval_batch_size=8, eval_batches=4, val_batches=2))
  config.data.seq_len = 64  # FieldReferences: the models' vocab_size follows data.vocab_size
  config.data.vocab_size = 512
  config.teacher.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=192)
  config.student.update(d_model=32, num_layers=1, num_heads=2, num_kv_heads=1, mlp_dim=96)
  config.teacher_train.update(steps=60, warmup_steps=5)
  config.student_train.update(steps=30, warmup_steps=5)
  config.log_every = 5
  config.checkpoint_every = 20
  config.num_samples = 2
  config.sample_tokens = 12
  return config


def _ablate(config):
  # The default models on shorter rows and fewer steps: 30-odd runs in about 30 minutes.
  config.data.seq_len = 64
  config.data.eval_batches = 12
  config.data.val_batches = 4
  config.student_train.update(steps=150, warmup_steps=15)
  config.checkpoint_every = 150
  config.num_samples = 0
  config.progress_bar = False
  config.sweep = sweep()
  return config


def _ablate_smoke(config):
  config = _smoke(config)
  config.num_samples = 0
  config.progress_bar = False
  config.sweep = sweep(smoke=True)
  return config
