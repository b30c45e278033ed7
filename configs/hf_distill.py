"""Any Hugging Face teacher into any student that shares its tokenizer (e.g. one pruned from it).

Both architectures are read from the two directories' config.json when the config is built, so
config.teacher and config.student always fit them:

  python -m kdjax.main --workdir=runs/kd \
      --config=configs/hf_distill.py:teacher=/models/Qwen2.5-7B,student=students/qwen-pruned

The arg is comma-separated key=value pairs: `teacher` and `student` (model directories, required;
the student is the init of both students), `data` (a TFDS text dataset, default 'c4/en', which
must already be prepared in data.data_dir), `devices` and `memory_gib` (the target hardware,
default one 8-GPU host of 80 GiB) and `topology` (one of kdjax.aot.TARGETS, e.g. h100x8, for
scripts/compile_for.py to compile every step for it before you run). Everything else is
configs/_hf_distill.py's (mode 'distill', forward KL at T = 1, chunked loss, bf16 compute with
f32 student params, a bf16 FSDP-sharded frozen teacher, remat 'full') and can be overridden as
usual, e.g. --config.student_train.steps=.

README.md ("Distilling a Hugging Face model") runs this end to end: prune, distill, export.
Having no paths, it has no presets for tests/test_configs.py to build; tests/test_hf_flow.py runs
it on tiny models instead.
"""

import ml_collections

from kdjax import cli, hf

_hf_distill = cli.sibling_config("_hf_distill", __file__)

PRESETS = ()  # every build needs two model directories (see the docstring)


def _parse(arg: str | None) -> dict[str, str]:
  pairs = dict(kv.split("=", 1) for kv in (arg or "").split(",") if kv)
  unknown = set(pairs) - {"teacher", "student", "data", "devices", "memory_gib", "topology"}
  if unknown or not {"teacher", "student"} <= set(pairs):
    raise ValueError("configs/hf_distill.py: give teacher=DIR,student=DIR (and optionally "
                     f"data=, devices=, memory_gib=, topology=); got {arg!r}.")
  return pairs


def _model(path: str) -> ml_collections.ConfigDict:
  """The directory's architecture in every model field, with kdjax's training numerics."""
  fields = {k: v for k, v in hf.model_config(path).__dict__.items()
            if k not in ("dtype", "param_dtype", "remat_policy", "scan_layers", "attention_impl",
                         "attention_block_size")}
  return _hf_distill.published(**fields)


def get_config(arg=None):
  """Any Hugging Face pair, `arg` = 'teacher=DIR,student=DIR[,...]' (see the module docstring):

    python -m kdjax.main --workdir=runs/kd \
        --config=configs/hf_distill.py:teacher=/path/to/teacher,student=/path/to/student
  """
  args = _parse(arg)
  config = _hf_distill.base_config(teacher_hf=args["teacher"], student_init=args["student"])
  config.teacher = _model(args["teacher"])
  config.student = _model(args["student"])
  # Tokenizer ids fit both (a padded vocabulary is fine); checked against the tokenizer at start.
  config.data.vocab_size = min(config.teacher.vocab_size, config.student.vocab_size)
  if "data" in args:
    config.data.name = args["data"]
  config.data.update(dict(batch_size=64, eval_batch_size=8, eval_batches=32, val_batches=8,
                          num_shards=8))
  config.student_train.update(_hf_distill.train_settings(steps=5_000, learning_rate=1e-5,
                                                         grad_accum_steps=4))
  config.distill.loss_chunk_size = 8192
  config.target = ml_collections.ConfigDict(dict(
      name="target hardware", devices=int(args.get("devices", 8)), processes=1,
      memory_gib=float(args.get("memory_gib", 80.0)), topology=args.get("topology", "")))
  return config
