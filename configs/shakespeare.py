"""Gemma-2-style distillation in miniature on the complete works of Shakespeare.

Trains a teacher, distills a ~4x smaller student from it, trains the same student from scratch on
the same batches for the same number of steps, and compares all three on held-out plays.

  python -m kdjax.main --config=configs/shakespeare.py --workdir=runs/shakespeare
  python -m kdjax.main --config=configs/shakespeare.py:smoke --workdir=runs/smoke

Presets (the part after ':'):
  (none)        the default run: about 20 minutes on a 2-core CPU (README has the measured
                table); its loss and the students' learning rate are the validation winners
                of the `ablate` sweep.
  smoke         the same pipeline shrunk to about 30 seconds; tests use it.
  ablate        the provided ablation set (see `sweep`) on three seeds, for scripts/ablate.py;
                about 56 minutes alone on a 2-core CPU (README "Ablations"):
                  python scripts/ablate.py --config=configs/shakespeare.py:ablate \
                      --workdir=runs/ablate
  ablate_smoke  a small sweep on the smoke sizes and two seeds; tests use it.

Any field can be overridden, e.g. `--config.distill.temperature=2 --config.seed=1`.
"""

import ml_collections

from kdjax import settings
from kdjax.sharding import DEFAULT_RULES

PRESETS = ("", "smoke", "ablate", "ablate_smoke")
# The :ablate sweep's base point: its loss settings and the students' learning rate.
SWEEP_BASE = dict(loss="forward_kl", temperature=1.0, alpha=1.0, lr=6e-3)


def _point(name, group, phase="distilled", **overrides):
  return dict(name=name, group=group, phase=phase,
              overrides={k.replace("__", "."): v for k, v in overrides.items()})


def sweep(smoke: bool = False) -> list[dict]:
  """The provided ablations, as points for scripts/ablate.py (kdjax.ablation): each point is the
  base config with a few overrides; within a seed all share the student init, the batches and
  the teacher. Every point runs on each of `sweep_seeds`.

  loss_temperature_alpha  divergence {forward KL, reverse KL} x T {1, 2} x alpha {0.5, 1},
                          and cross-entropy alone (alpha = 0: the scratch student) once
  learning_rate           the students' learning rate x {1, 2}, distilled and from scratch
  student_size            a narrower, shallower student and the default, distilled and from
                          scratch
  data_budget             distilled vs scratch at 1/2 and 1 x the student's steps
  """
  losses = ("forward_kl", "reverse_kl")
  temperatures, alphas = ((1.0,), (0.5, 1.0)) if smoke else ((1.0, 2.0), (0.5, 1.0))
  # Cross-entropy alone (alpha = 0) reads no teacher: it is the scratch student itself.
  points = [_point("cross_entropy", "loss_temperature_alpha", "scratch")]
  points += [_point(f"{loss}_T{t:g}_a{a:g}", "loss_temperature_alpha", distill__loss=loss,
                    distill__temperature=t, distill__alpha=a)
             for loss in losses for t in temperatures for a in alphas]
  # The students' learning rate and its double, with and without the teacher.
  base_lr = SWEEP_BASE["lr"]
  for lr in ((2 * base_lr,) if smoke else (base_lr, 2 * base_lr)):
    for phase in ("distilled", "scratch"):
      points.append(_point(f"lr{lr:g}_{phase}", "learning_rate", phase,
                           student_train__learning_rate=lr))
  sizes = ({"s": (16, 1)} if smoke else {"s": (64, 1), "m": (96, 2)})
  for size, (width, layers) in sizes.items():
    for phase in ("distilled", "scratch"):
      points.append(_point(f"{size}_{phase}", "student_size", phase, student__d_model=width,
                           student__num_layers=layers, student__mlp_dim=width * 8 // 3 // 8 * 8))
  base_steps = 30 if smoke else 150
  for steps in (base_steps // 2, base_steps):
    for phase in ("distilled", "scratch"):
      points.append(_point(f"steps{steps}_{phase}", "data_budget", phase,
                           student_train__steps=steps,
                           student_train__warmup_steps=max(1, steps // 10)))
  return points


def get_config(arg=None):
  """The Shakespeare experiment; `arg` is one of PRESETS (the module docstring lists them):

    python -m kdjax.main --config=configs/shakespeare.py --workdir=runs/shakespeare  # ~20 min
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
  # The students' learning rate is the provided sweep's choice on the validation plays, confirmed
  # at full length; 400 steps fill the 15-minute budget of the default run (README "Ablations").
  config.student_train = settings.config_section(settings.TrainSettings, steps=400,
                                                 learning_rate=1.2e-2, warmup_steps=40)
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

  # The loss (settings.DistillSettings): forward KL at T = 1 with alpha = 1 (soft targets alone),
  # the provided sweep's choice on the validation plays (README "Ablations"); feature terms,
  # schedules, a teacher cache, on-policy and sequence-level data are all off by default, e.g.
  # --config.distill.temperature_schedule.kind=linear --config.distill.temperature_schedule.end=1
  config.distill = settings.distill_section(alpha=1.0)

  # How the frozen teacher runs during distillation and evaluation: '' keeps config.teacher's
  # dtypes; e.g. param_dtype='bfloat16' halves its memory. Empty sharding_rules = sharding_rules.
  config.frozen_teacher = ml_collections.ConfigDict(dict(dtype="", param_dtype="",
                                                         sharding_rules=[]))

  # data x fsdp x tensor devices; -1 = all remaining devices.
  config.mesh = settings.config_section(settings.MeshSettings)
  config.sharding_rules = [list(rule) for rule in DEFAULT_RULES]
  # The hardware this config is sized for; tests/test_configs.py checks that the training state
  # (params, optimizer state and the frozen teacher) fits one device's memory on it. `topology`
  # names an accelerator target of kdjax.aot.TARGETS, which scripts/compile_for.py compiles
  # for ('' = none: the CPU here).
  config.target = ml_collections.ConfigDict(dict(name="laptop CPU", devices=1, processes=1,
                                                 memory_gib=8.0, topology=""))

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
  # The default models on shorter rows and fewer steps, three seeds. The base point is fixed here
  # (SWEEP_BASE), so the measured sweep stays what it was after the default took its winners.
  config.data.seq_len = 64
  config.data.eval_batches = 12
  config.data.val_batches = 12
  config.student_train.update(steps=150, warmup_steps=15, learning_rate=SWEEP_BASE["lr"])
  config.distill.update(loss=SWEEP_BASE["loss"], temperature=SWEEP_BASE["temperature"],
                        alpha=SWEEP_BASE["alpha"])
  config.checkpoint_every = 150
  config.num_samples = 0
  config.progress_bar = False
  config.sweep = sweep()
  config.sweep_seeds = [0, 1, 2]
  return config


def _ablate_smoke(config):
  config = _smoke(config)
  config.num_samples = 0
  config.progress_bar = False
  config.sweep = sweep(smoke=True)
  config.sweep_seeds = [0, 1]
  return config
