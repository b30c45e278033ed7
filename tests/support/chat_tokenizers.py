"""Small Hugging Face tokenizer directories with chat templates, for tests (no hub).

Each model style is a byte-level BPE tokenizer.json trained here on a few strings, with the
style's turn markers as special tokens, and a tokenizer_config.json naming bos/eos the way the
real checkpoint does. The chat template goes either into tokenizer_config.json's "chat_template"
or into chat_template.jinja (where tokenizer_config.json then holds a decoy that a reader must
not use: transformers 5 prefers the .jinja file).
"""

from __future__ import annotations

import json
import os

import tokenizers
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

# Llama 3's split pattern (Qwen's differs only in splitting digits one by one).
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+"
          r"[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TRAIN = [
    "system user assistant model Hello there! How are you today? I am fine, thank you.",
    "You are a helpful assistant. Answer briefly and politely, in plain words.",
    "What is the capital of France? Paris is the capital of France.",
    'Here is JSON: {"key": "value", "list": [1, 2, 3], "quote": "he said \\"hi\\""}',
    "line one\nline two\n\n  indented line\n\tand a tab",
    "Привет, как дела? 東京 日本語 café naïve 🙂 👍🏽 Ωμέγα",
    "def f(x):\n    return x * 2  # doubles\n",
]
DECOY = "DECOY TEMPLATE: {{ messages|length }}"

# Copies of public chat templates (tool-calling branches dropped, control flow kept), as their
# tokenizer_config.json files hold them.

LLAMA3 = r"""{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>

'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>

' }}{% endif %}"""

LLAMA31 = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

QWEN25 = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

QWEN3 = r"""{%- if messages[0].role == 'system' %}
    {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

GEMMA3 = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# The features transformers gives templates beyond the ones above: namespace, loop controls,
# tojson with its options, dict(), {% generation %}, eos_token, strftime_now, and block tags that
# trim_blocks and lstrip_blocks tidy.
FEATURES = r"""{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}
{{- bos_token ~ 'last user: ' ~ ns.last_user ~ '\n' }}
{%- for m in messages %}
    {%- if m.role == 'system' %}{% continue %}{% endif %}
    {{- m|tojson }}
    {%- if m.role == 'assistant' %}{% generation %}{{ m.content ~ eos_token }}{% endgeneration %}{% endif %}
    {%- if loop.index > 6 %}{% break %}{% endif %}
{%- endfor %}
{{ dict(b='é "q"', a=[1, 2])|tojson(indent=2, sort_keys=True) }}
    {% if add_generation_prompt %}
GO
    {% endif %}
{{ strftime_now('%Y') | length }}"""


# Each style: special tokens (in id order after the vocabulary), the tokenizer_config entries,
# whether a post-processor adds BOS (as Llama 3's does; apply_chat_template never uses it).
STYLES = {
    "llama3": dict(
        specials=["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                  "<|end_header_id|>", "<|eot_id|>"],
        config={"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
        post_bos=True, nfc=False),
    "qwen": dict(
        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        config={"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"},
        post_bos=False, nfc=True),
    "gemma": dict(
        specials=["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"],
        config={"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>",
                "unk_token": "<unk>"},
        post_bos=False, nfc=False),
}


def _write_json(path, value):
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f, ensure_ascii=False)


def _tokenizer(style: str, extra_text) -> tokenizers.Tokenizer:
  spec = STYLES[style]
  tok = tokenizers.Tokenizer(models.BPE(ignore_merges=True))
  if spec["nfc"]:
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(_TRAIN + list(extra_text), trainers.BpeTrainer(
      vocab_size=600, show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  tok.add_special_tokens(spec["specials"])
  post = processors.ByteLevel(trim_offsets=False)
  bos = spec["config"]["bos_token"]
  if spec["post_bos"]:
    post = processors.Sequence([post, processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))])])
  tok.post_processor = post
  return tok


def build(directory: str, style: str, template: str, in_jinja_file: bool, extra_text=()) -> str:
  """Writes a tokenizer directory of `style` whose chat template is `template`."""
  os.makedirs(directory, exist_ok=True)
  tok = _tokenizer(style, extra_text)
  tok.save(os.path.join(directory, "tokenizer.json"))
  config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
            **STYLES[style]["config"],
            "added_tokens_decoder": {
                str(i): {"content": t.content, "lstrip": False, "rstrip": False,
                         "normalized": False, "single_word": False, "special": True}
                for i, t in tok.get_added_tokens_decoder().items()}}
  if in_jinja_file:
    config["chat_template"] = DECOY
    with open(os.path.join(directory, "chat_template.jinja"), "w", encoding="utf-8") as f:
      f.write(template)
  else:
    config["chat_template"] = template
  _write_json(os.path.join(directory, "tokenizer_config.json"), config)
  return directory
