"""kdjax.data.chat_template and the chat answer spans of kdjax.data.encoding, against transformers.

Tokenizer directories are built here (support.chat_tokenizers) with copies of public chat
templates (Llama 3, Llama 3.1, Qwen 2.5, Qwen 3, Gemma 3; tool-calling branches dropped, control
flow kept). transformers' `apply_chat_template` is the oracle for text and ids; the answer spans
are checked against each assistant message's own content and the template's end-of-turn marker.
"""

import jinja2
import numpy as np
import pytest

from kdjax.data import chat_template, encoding, hf_tokenizer
from kdjax.data.records import DataError
from support import chat_tokenizers
from support.chat_tokenizers import FEATURES, GEMMA3, LLAMA3, LLAMA31, QWEN3, QWEN25

transformers = pytest.importorskip("transformers")

# name -> (tokenizer style, template, what an assistant message's answer tokens must decode to;
# None where the template renders a turn differently once later turns follow).
TEMPLATES = {
    "llama3": ("llama3", LLAMA3, lambda c: c.strip() + "<|eot_id|>"),
    "llama3.1": ("llama3", LLAMA31, lambda c: c.strip() + "<|eot_id|>"),
    "qwen2.5": ("qwen", QWEN25, lambda c: c + "<|im_end|>\n"),
    "qwen3": ("qwen", QWEN3, None),
    "gemma3": ("gemma", GEMMA3, lambda c: c.strip() + "<end_of_turn>\n"),
    "features": ("llama3", FEATURES, None),
}
ANSWERED = [n for n, (_, _, answer) in TEMPLATES.items() if answer]


def _chat(*turns):
  return [{"role": role, "content": content} for role, content in zip(turns[::2], turns[1::2])]


# Every conversation alternates user/assistant after an optional system message (Gemma's rule).
CONVERSATIONS = [
    _chat("user", "Hello!"),
    _chat("system", "You are a helpful assistant.", "user", "What is the capital of France?",
          "assistant", "Paris is the capital of France."),
    _chat("user", "Привет! 東京 café 🙂", "assistant", "Ωμέγα 👍🏽 naïve",
          "user", 'Here is JSON: {"key": "va\\"lue", "list": [1, 2]}',
          "assistant", "It says \"hi\" and 'bye'.\nline two\n\n  indented\tend"),
    _chat("system", "  Be brief.\n", "user", "  spaced  ", "assistant", "  spaced answer  \n",
          "user", "{{ not a template }} {% raw %} <|im_end|> <end_of_turn>",
          "assistant", "def f(x):\n    return x * 2  # doubles\n"),
    _chat("user", "What is 2+2?", "assistant", "<think>\nadd them\n</think>\n\nIt is 4.",
          "user", "And 3+3?"),
]
TEXT = [m["content"] for conv in CONVERSATIONS for m in conv]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  """(template name, 'config' | 'jinja') -> a tokenizer directory with that template there."""
  return {(name, where): chat_tokenizers.build(str(tmp_path_factory.mktemp(name)), style, source,
                                               in_jinja_file=where == "jinja", extra_text=TEXT)
          for name, (style, source, _) in TEMPLATES.items() for where in ("config", "jinja")}


@pytest.fixture(scope="module")
def loaded(dirs):
  """(name, where) -> (kdjax's chat, kdjax's tokenizer, transformers' tokenizer)."""
  out = {}
  for key, d in dirs.items():
    tok = hf_tokenizer.load(d)
    out[key] = chat_template.load(tok, d, ""), tok, transformers.AutoTokenizer.from_pretrained(d)
  return out


def _make_chat(dirs, name, source, where=("qwen2.5", "config")):
  """A JinjaChat of `source` over the tokenizer of `where`, as data.chat_template would give."""
  d = dirs[where]
  return chat_template.JinjaChat(source, hf_tokenizer.load(d), chat_template.special_tokens(d),
                                 name)


@pytest.mark.parametrize("where", ["config", "jinja"])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_text_and_ids_equal_transformers(dirs, loaded, name, where):
  d = dirs[name, where]
  source, path = chat_template.find_template(d)
  assert source == TEMPLATES[name][1]
  assert path.endswith("chat_template.jinja" if where == "jinja" else "tokenizer_config.json")
  chat, tok, theirs = loaded[name, where]
  assert isinstance(chat, chat_template.JinjaChat) and chat.origin == path
  assert theirs.chat_template == source  # transformers read the same file
  for conv in CONVERSATIONS:
    for gen in (False, True):
      text = theirs.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
      ids = theirs.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)["input_ids"]
      assert chat.text(conv, add_generation_prompt=gen) == text, (conv, gen)
      assert chat.ids(conv, add_generation_prompt=gen) == ids, (conv, gen)
  if where == "jinja":  # the same file named by data.chat_template
    named = chat_template.load(tok, d, path)
    assert [named.ids(c) for c in CONVERSATIONS] == [chat.ids(c) for c in CONVERSATIONS]


def _runs(answers):
  """[start, end) of each run of 1s."""
  edges = np.flatnonzero(np.diff(np.concatenate([[0], answers, [0]])))
  return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("train_on", ["assistant", "last_assistant", "all"])
@pytest.mark.parametrize("name", ANSWERED)
def test_answer_spans_are_the_assistant_turns(loaded, name, train_on):
  chat, tok, theirs = loaded[name, "config"]
  answer = TEMPLATES[name][2]
  encoder = encoding.Encoder("chat", tok, chat, train_on=train_on)
  for conv in CONVERSATIONS:
    replies = [answer(m["content"]) for m in conv if m["role"] == "assistant"]
    if not replies:
      continue
    ids, answers = encoder.ids_and_answers({"messages": conv})
    assert ids == theirs.apply_chat_template(conv)["input_ids"]
    assert answers.shape == (len(ids),) and set(answers.tolist()) <= {0, 1}
    if train_on == "all":
      assert answers.all()
      continue
    spans = [theirs.decode(ids[s:e], skip_special_tokens=False, clean_up_tokenization_spaces=False)
             for s, e in _runs(answers)]
    assert spans == (replies if train_on == "assistant" else replies[-1:]), conv
    weights = encoder({"messages": conv})["weights"]
    np.testing.assert_array_equal(weights, answers[1:])


QWEN25_MARKED = QWEN25.replace(
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}",
    "{{- '<|im_start|>' + message.role + '\\n' }}{% if message.role == 'assistant' %}"
    "{% generation %}{{- message.content + '<|im_end|>' + '\\n' }}{% endgeneration %}"
    "{% else %}{{- message.content + '<|im_end|>' + '\\n' }}{% endif %}")


def test_answer_spans_equal_transformers_assistant_masks(tmp_path):
  assert QWEN25_MARKED != QWEN25
  d = chat_tokenizers.build(str(tmp_path), "qwen", QWEN25_MARKED, in_jinja_file=True,
                            extra_text=TEXT)
  tok, theirs = hf_tokenizer.load(d), transformers.AutoTokenizer.from_pretrained(d)
  encoder = encoding.Encoder("chat", tok, chat_template.load(tok, d, ""))
  for conv in CONVERSATIONS[1:4]:
    out = theirs.apply_chat_template(conv, return_dict=True, return_assistant_tokens_mask=True)
    ids, answers = encoder.ids_and_answers({"messages": conv})
    assert ids == out["input_ids"]
    assert answers.tolist() == out["assistant_masks"], conv
    # {% generation %} changes nothing in the text.
    assert theirs.apply_chat_template(conv, tokenize=False) == theirs.apply_chat_template(
        conv, tokenize=False, chat_template=QWEN25)


THINKING = _chat("user", "What is 2+2?", "assistant", "<think>\nadd\n</think>\n\nIt is 4.",
                 "user", "And 3+3?", "assistant", "<think>\nadd again\n</think>\n\nIt is 6.")


@pytest.mark.parametrize("name, conv", [("qwen3", THINKING), ("features", CONVERSATIONS[2])],
                         ids=["qwen3", "features"])
def test_template_that_rewrites_earlier_turns_is_refused(loaded, name, conv):
  """Qwen 3 drops the reasoning of turns before the last question; FEATURES prints the index of
  the last user turn first. Either way a turn's tokens change once later turns follow."""
  chat, tok, theirs = loaded[name, "config"]
  with pytest.raises(DataError, match="cannot find the answer's tokens"):
    encoding.Encoder("chat", tok, chat).ids_and_answers({"messages": conv})
  ids, answers = encoding.Encoder("chat", tok, chat, train_on="all").ids_and_answers(
      {"messages": conv})
  assert ids == theirs.apply_chat_template(conv)["input_ids"] and answers.all()


def test_last_assistant_of_a_thinking_template_keeps_its_reasoning(loaded):
  chat, tok, theirs = loaded["qwen3", "config"]
  encoder = encoding.Encoder("chat", tok, chat, train_on="last_assistant")
  ids, answers = encoder.ids_and_answers({"messages": THINKING})
  assert ids == theirs.apply_chat_template(THINKING)["input_ids"]
  [(start, end)] = _runs(answers)
  assert end == len(ids)
  assert theirs.decode(ids[start:end], skip_special_tokens=False) == (
      "<think>\nadd again\n</think>\n\nIt is 6.<|im_end|>\n")


def test_printing_an_undefined_variable_is_refused(dirs):
  chat = _make_chat(dirs, "dated", "Today is {{ date_string }}.{{ messages[0].content }}")
  with pytest.raises(DataError, match="needs a variable kdjax does not give it.*date_string"):
    chat.text(CONVERSATIONS[0])
  # Testing it, or giving it a default, is fine (and is what transformers renders).
  source = "{{ date_string | default('1 Jan') }}{% if date_string is defined %}!{% endif %}"
  assert _make_chat(dirs, "default", source).text(CONVERSATIONS[0]) == "1 Jan"


def test_raise_exception_is_a_data_error(loaded):
  chat, tok, theirs = loaded["gemma3", "config"]
  bad = _chat("user", "one", "user", "two")
  with pytest.raises(jinja2.TemplateError, match="must alternate"):
    theirs.apply_chat_template(bad, tokenize=False)
  with pytest.raises(DataError, match="refused the conversation.*must alternate"):
    chat.ids(bad)
  with pytest.raises(DataError, match="must alternate"):
    encoding.Encoder("chat", tok, chat, train_on="all").ids_and_answers({"messages": bad})


def test_a_template_that_does_not_parse_is_refused(dirs):
  with pytest.raises(DataError, match="does not parse"):
    _make_chat(dirs, "broken", "{% for m in messages %}{{ m.content }}")


@pytest.mark.parametrize("source", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ messages.__class__ }}",
    "{{ messages|attr('__class__') }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
    "{{ namespace.__init__.__globals__ }}",
    "{{ dict.__call__.__globals__ }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ self.__init__.__globals__ }}",
    "{{ '{0.__class__}'.format(messages) }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}{{ ns }}",
    "{{ namespace(__dict__=1) }}",
    "{% set x = messages.append({'role': 'x'}) %}{{ messages|length }}",
    "{% set x = messages[0].update(role='x') %}{{ messages[0].role }}",
])
def test_the_sandbox_keeps_python_internals_out(dirs, source):
  chat = _make_chat(dirs, "escape", source)
  with pytest.raises((DataError, jinja2.exceptions.SecurityError)) as e:
    text = chat.text(CONVERSATIONS[1])
    pytest.fail(f"rendered {text!r}")
  assert "does not parse" not in str(e.value)
