"""kdjax.data.hf_tokenizer against transformers' own tokenizers, on tokenizers built here.

No hub: SentencePiece models (Llama 2 and Gemma settings) are trained with `sentencepiece`, and
byte-level BPE tokenizer.json files (Llama 3 and Qwen settings) with `tokenizers`, on generated
text. transformers loads each directory as it would a hub checkpoint and is the oracle for ids,
special ids and decoded text, on a few hundred sentences it never saw.
"""

import io
import json
import os
import random
import unicodedata

import pytest
import sentencepiece as spm
import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from kdjax.data import hf_tokenizer, pipeline
from kdjax.data import tokenizer as tokenizer_lib

transformers = pytest.importorskip("transformers")

_WORDS = (
    "the quick brown fox jumps over a lazy dog and then it is gone . , ; ! ? don't it's we're "
    "I'll they've café naïve façade Ünïcödé 東京 日本語 ещё привет Ωμέγα 🙂 👍🏽 e\u0301 ﬁne "
    "3.14 2024 1,000,000 $5 (x) [y] {z} @user #tag https://example.com a_b C++"
).split()
_SEPARATORS = (" ", " ", " ", " ", "  ", "   ", "\t", "\n", "\n\n", " \n ", ", ", ". ")
# Strings that are special tokens in some of the tokenizers below and plain text in the others.
_MARKERS = ("<s>", "</s>", "<unk>", "<bos>", "<eos>", "<pad>", "<start_of_turn>",
            "<|begin_of_text|>", "<|end_of_text|>", "<|endoftext|>", "<|im_start|>")


def _sentences(n: int, seed: int) -> list[str]:
  """Words, digits and symbols of several scripts, joined by runs of spaces, tabs and newlines;
  some with leading or trailing whitespace, a few with special-token strings inside."""
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    parts = []
    for _ in range(rng.randint(1, 14)):
      word = str(rng.randint(0, 10**rng.randint(1, 7))) if rng.random() < 0.15 else rng.choice(_WORDS)
      if rng.random() < 0.04:
        word = rng.choice(_MARKERS) + word
      parts += [word, rng.choice(_SEPARATORS)]
    text = "".join(parts[:-1] if rng.random() < 0.6 else parts)
    out.append(rng.choice(("", "", "", " ", "  ", "\n", "\t")) + text)
  return out


TRAIN = _sentences(300, seed=0)
SENTENCES = _sentences(300, seed=1) + [
    "", " ", "  fox", "fox  ", "<s>", "<s>fox", " <s>fox", "a<s>b", " <s> b", "<s><s>",
    "</s>\n", "<bos>the<eos> fox", "\n\n\n", "\u00a0nbsp", "x\u200by"]


# ---------------------------------------------------------------------------- building tokenizers


def _write_json(path, value):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, ensure_ascii=False)


def _spm_lines():
  for text in TRAIN:
    yield from (line for line in text.split("\n") if line.strip())


def _train_spm(**options) -> bytes:
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=_spm_lines(), model_writer=model, model_type="bpe", vocab_size=600,
      hard_vocab_limit=False, byte_fallback=True, split_digits=True, character_coverage=1.0,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True, num_threads=1, minloglevel=2, **options)
  return model.getvalue()


def _llama2(directory, legacy):
  """Llama 2 / Mistral settings: unk, <s>, </s> at 0-2, no pad, a dummy "▁" prefix."""
  with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
    f.write(_train_spm(unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
  _write_json(os.path.join(directory, "tokenizer_config.json"), {
      "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>",
      "unk_token": "<unk>", "pad_token": None, "add_bos_token": True, "add_eos_token": False,
      "legacy": legacy, "clean_up_tokenization_spaces": False})


def _gemma(directory):
  """Gemma settings: pad, eos, bos, unk at 0-3, no dummy prefix, user-defined turn markers."""
  with open(os.path.join(directory, "tokenizer.model"), "wb") as f:
    f.write(_train_spm(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>",
                       eos_piece="<eos>", bos_piece="<bos>", add_dummy_prefix=False,
                       user_defined_symbols=["<start_of_turn>", "<end_of_turn>"]))
  pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
  _write_json(os.path.join(directory, "tokenizer_config.json"), {
      "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>",
      "unk_token": "<unk>", "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False,
      "added_tokens_decoder": {str(i): {"content": p, "lstrip": False, "rstrip": False,
                                        "normalized": False, "single_word": False,
                                        "special": i < 4} for i, p in enumerate(pieces)}})


def _added_tokens_decoder(tok: tokenizers.Tokenizer) -> dict:
  return {str(i): {"content": t.content, "lstrip": False, "rstrip": False, "normalized": False,
                   "single_word": False, "special": t.special}
          for i, t in tok.get_added_tokens_decoder().items()}


def _byte_level_bpe(split_pattern: str, nfc: bool) -> tokenizers.Tokenizer:
  tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
  if nfc:
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(split_pattern), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(TRAIN, trainers.BpeTrainer(
      vocab_size=700, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
                 r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+"
               r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _llama3(directory):
  """Llama 3 settings: byte-level BPE, special tokens after the vocabulary, BOS by template."""
  tok = _byte_level_bpe(_LLAMA3_SPLIT, nfc=False)
  tok.add_special_tokens(["<|begin_of_text|>", "<|end_of_text|>", "<|eot_id|>"])
  bos = "<|begin_of_text|>"
  tok.post_processor = processors.Sequence([
      processors.ByteLevel(trim_offsets=False),
      processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                    special_tokens=[(bos, tok.token_to_id(bos))])])
  tok.save(os.path.join(directory, "tokenizer.json"))
  _write_json(os.path.join(directory, "tokenizer_config.json"), {
      "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos,
      "eos_token": "<|end_of_text|>", "clean_up_tokenization_spaces": True,
      "added_tokens_decoder": _added_tokens_decoder(tok)})


def _qwen(directory):
  """Qwen 2 settings: NFC, byte-level BPE, no BOS at all (config.json's bos_token_id aside)."""
  tok = _byte_level_bpe(_QWEN_SPLIT, nfc=True)
  tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  tok.post_processor = processors.ByteLevel(trim_offsets=False)
  tok.save(os.path.join(directory, "tokenizer.json"))
  eos = tok.token_to_id("<|endoftext|>")
  _write_json(os.path.join(directory, "tokenizer_config.json"), {
      "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|endoftext|>",
      "pad_token": "<|endoftext|>", "unk_token": None, "errors": "replace",
      "added_tokens_decoder": _added_tokens_decoder(tok)})
  _write_json(os.path.join(directory, "config.json"), {"bos_token_id": eos, "eos_token_id": eos})


def _llama2_json(directory, llama2_dir):
  """A Llama 2 hub checkpoint's tokenizer.json as transformers 4 wrote it (a normalizer that
  prepends "▁"), which transformers 5 replaces by its own LlamaTokenizer pipeline."""
  transformers.AutoTokenizer.from_pretrained(llama2_dir).save_pretrained(directory)
  path = os.path.join(directory, "tokenizer.json")
  tok = tokenizers.Tokenizer.from_file(path)
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
  tok.pre_tokenizer = None
  tok.save(path)
  if os.path.exists(os.path.join(directory, "tokenizer.model")):
    os.remove(os.path.join(directory, "tokenizer.model"))


_BUILDERS = {
    "llama2": lambda d, dirs: _llama2(d, legacy=False),
    "llama2_legacy": lambda d, dirs: _llama2(d, legacy=True),
    "gemma": lambda d, dirs: _gemma(d),
    "llama3": lambda d, dirs: _llama3(d),
    "qwen": lambda d, dirs: _qwen(d),
    "llama2_json": lambda d, dirs: _llama2_json(d, dirs["llama2"]),
}
SENTENCEPIECE = ("llama2", "llama2_legacy", "gemma")
TOKENIZER_JSON = ("llama3", "qwen", "llama2_json")


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
  dirs = {}
  for name, build in _BUILDERS.items():
    dirs[name] = str(tmp_path_factory.mktemp(name))
    build(dirs[name], dirs)
  return dirs


@pytest.fixture(scope="module")
def pairs(model_dirs):
  """name -> (kdjax's tokenizer, transformers' tokenizer) of the same directory."""
  return {name: (hf_tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(d))
          for name, d in model_dirs.items()}


# ------------------------------------------------------------------------------------ properties


@pytest.mark.parametrize("name", SENTENCEPIECE + TOKENIZER_JSON)
def test_ids_equal_transformers(pairs, name):
  ours, theirs = pairs[name]
  for text in SENTENCES:
    assert ours.encode(text) == theirs(text, add_special_tokens=False)["input_ids"], repr(text)
    assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"], repr(text)


@pytest.mark.parametrize("name", SENTENCEPIECE + TOKENIZER_JSON)
def test_decode_equals_transformers(pairs, name):
  ours, theirs = pairs[name]
  for text in SENTENCES:
    ids = theirs(text)["input_ids"]  # with BOS where there is one: decode must drop it
    assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True), repr(text)


@pytest.mark.parametrize("name", SENTENCEPIECE + TOKENIZER_JSON)
def test_special_ids_equal_transformers(pairs, name):
  ours, theirs = pairs[name]
  assert (ours.bos_id, ours.eos_id, ours.unk_id) == (
      theirs.bos_token_id, theirs.eos_token_id, theirs.unk_token_id)
  # Without a pad token, pad is EOS: a filler that decode drops (see the module docstring).
  assert ours.pad_id == (theirs.eos_token_id if theirs.pad_token_id is None
                         else theirs.pad_token_id)
  # transformers may append a default token the files never use (GemmaTokenizer's <mask>).
  assert ours.vocab_size == 1 + max(theirs.get_vocab().values()) - (name == "gemma")


def _plain(text):
  return not any(marker in text for marker in _MARKERS)


@pytest.mark.parametrize("name", ("gemma", "llama3"))
def test_lossless_tokenizers_round_trip(pairs, name):
  ours, _ = pairs[name]
  for text in filter(_plain, SENTENCES):
    assert ours.decode(ours.encode(text)) == text


def test_qwen_round_trips_up_to_nfc_and_has_no_bos(pairs):
  ours, _ = pairs["qwen"]
  assert ours.bos_id is None  # tokenizer_config's null wins over config.json's bos_token_id
  for text in filter(_plain, SENTENCES):
    assert ours.decode(ours.encode(text)) == unicodedata.normalize("NFC", text)


def test_llama2_round_trips_except_the_space_that_stands_for_the_prefix(pairs):
  ours, _ = pairs["llama2"]
  for text in filter(_plain, SENTENCES):
    expected = text[1:] if text.startswith(" ") else text
    assert ours.decode(ours.encode(text)) == expected


def test_tokenizer_json_and_tokenizer_model_of_one_model_agree(pairs):
  (from_model, _), (from_json, _) = pairs["llama2"], pairs["llama2_json"]
  for text in SENTENCES:
    assert from_json.encode(text) == from_model.encode(text), repr(text)


def test_decode_drops_a_named_special_token_the_file_marks_plain(tmp_path):
  tok = _byte_level_bpe(_LLAMA3_SPLIT, nfc=False)
  tok.add_tokens(["<eos>"])  # not special in tokenizer.json; tokenizer_config names it EOS
  tok.save(str(tmp_path / "tokenizer.json"))
  _write_json(tmp_path / "tokenizer_config.json",
              {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<eos>"})
  ours, theirs = hf_tokenizer.load(tmp_path), transformers.AutoTokenizer.from_pretrained(tmp_path)
  ids = ours.encode("the fox<eos> jumps")
  assert ids == theirs("the fox<eos> jumps")["input_ids"] and ours.eos_id in ids
  assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True) == "the fox jumps"


# ----------------------------------------------------------------------------- loading and files


def test_load_picks_the_format_by_path(model_dirs, tmp_path):
  directory = model_dirs["llama2"]
  model_file = os.path.join(directory, "tokenizer.model")
  assert isinstance(tokenizer_lib.load(directory), hf_tokenizer.HFTokenizer)
  assert isinstance(tokenizer_lib.load(model_file), hf_tokenizer.HFTokenizer)
  kdjax_file = tmp_path / "shakespeare_bpe300.model"
  kdjax_file.write_bytes(tokenizer_lib.train(["alpha beta gamma delta"] * 50, 300))
  own = tokenizer_lib.load(kdjax_file)
  assert isinstance(own, tokenizer_lib.Tokenizer) and (own.pad_id, own.bos_id) == (0, 1)
  # A Hugging Face model is loaded, never trained over; a wrong file name says where to look.
  assert tokenizer_lib.train_or_load(iter(()), directory, 1).vocab_size == \
      hf_tokenizer.load(directory).vocab_size
  renamed = tmp_path / "llama.model"
  renamed.write_bytes(open(model_file, "rb").read())
  with pytest.raises(ValueError, match="directory or its tokenizer.model"):
    tokenizer_lib.load(renamed)


def test_tokenizer_json_is_preferred_to_tokenizer_model(model_dirs, tmp_path):
  os.symlink(os.path.join(model_dirs["llama2"], "tokenizer.model"), tmp_path / "tokenizer.model")
  for name in ("tokenizer.json", "tokenizer_config.json"):
    os.symlink(os.path.join(model_dirs["llama3"], name), tmp_path / name)
  both = hf_tokenizer.load(tmp_path)
  json_only = tokenizers.Tokenizer.from_file(os.path.join(model_dirs["llama3"], "tokenizer.json"))
  assert both.encode("the quick brown fox") == json_only.encode(
      "the quick brown fox", add_special_tokens=False).ids


def test_special_ids_fall_back_to_config_json(model_dirs, tmp_path):
  os.symlink(os.path.join(model_dirs["llama3"], "tokenizer.json"), tmp_path / "tokenizer.json")
  _write_json(tmp_path / "config.json", {"bos_token_id": 5, "eos_token_id": [7, 8],
                                         "pad_token_id": None})
  tok = hf_tokenizer.load(tmp_path / "tokenizer.json")
  assert (tok.bos_id, tok.eos_id, tok.pad_id) == (5, 7, 7)


def test_copy_files_copies_what_exists(model_dirs, tmp_path):
  copied = hf_tokenizer.copy_files(model_dirs["qwen"], tmp_path / "export")
  assert copied == ["tokenizer.json", "tokenizer_config.json"]  # config.json is the model's
  assert sorted(os.listdir(tmp_path / "export")) == copied
  reloaded = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "export"))
  assert reloaded("the fox")["input_ids"] == hf_tokenizer.load(model_dirs["qwen"]).encode("the fox")
  (tmp_path / "no_tokenizer").mkdir()
  with pytest.raises(FileNotFoundError):
    hf_tokenizer.copy_files(tmp_path / "no_tokenizer", tmp_path / "nothing")


@pytest.mark.parametrize("name", ("tokenizer.json", "tokenizer.model"))
def test_unreadable_file_names_itself(tmp_path, name):
  (tmp_path / name).write_bytes(b"not a tokenizer")
  with pytest.raises(hf_tokenizer.UnreadableTokenizer, match=name):
    hf_tokenizer.load(tmp_path)


def test_pipeline_packs_documents_without_bos(pairs):
  tok, _ = pairs["qwen"]
  texts = ["the fox", "", "東京 2024", "a"]
  # One row holds every document whole: nothing is cut at a row boundary.
  batches = pipeline.eval_batches([{"text": t} for t in texts], tok, seq_len=64, batch_size=2)
  rows = [(b["inputs"][r], b["targets"][r], b["segment_ids"][r], b["mask"][r])
          for b in batches for r in range(2)]
  got, expected = [], [[*tok.encode(t), tok.eos_id] for t in texts]
  for inputs, targets, segment_ids, mask in rows:
    for s in range(1, segment_ids.max() + 1):  # 1, 2, ...: the empty text left no gap
      where = segment_ids == s
      got.append([*inputs[where], targets[where][-1]])
      assert mask[where].all()
    assert not mask[segment_ids == 0].any()
  assert got == [ids for ids in expected if len(ids) > 1]
