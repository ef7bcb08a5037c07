"""Published chat templates of the model families jaxalign loads, on small word-level tokenizers.

Each template is the one its model ships in ``tokenizer_config.json`` (SmolLM2's is read from the embedded GGUF;
the others are copied verbatim): SmolLM2-Instruct (ChatML with a default system message, ``<|im_start|>`` doubling
as BOS), Meta-Llama-3-Instruct (BOS written by the template), Qwen2-Instruct (ChatML with another default system
message) and Mistral-7B-Instruct-v0.3 (the system message folded into the last user turn). The tokenizers know
every word of the texts they are built for, so ``decode(encode(text)) == text`` exactly.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, decoders, pre_tokenizers
from tokenizers import models as token_models
from transformers import PreTrainedTokenizerFast

SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' "
    "+ message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful assistant.<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
MISTRAL_V03 = """{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""  # noqa: E501 (verbatim)


@dataclass(frozen=True)
class Family:
    """A chat template with its special tokens (``bos`` None: the family has none)."""

    name: str
    template: str
    specials: tuple[str, ...]
    bos: str | None
    eos: str
    # Whether the template writes a system message wherever the conversation ends (Mistral's only when the last
    # message is the user's: a prompt's rendering has it, the prompt + response's does not).
    system_in_every_rendering: bool = True


FAMILIES = {
    "smollm2": Family("smollm2", SMOLLM2, ("<|im_start|>", "<|im_end|>"), "<|im_start|>", "<|im_end|>"),
    "llama3": Family("llama3", LLAMA3, ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                        "<|eot_id|>"), "<|begin_of_text|>", "<|eot_id|>"),
    "qwen2": Family("qwen2", QWEN2, ("<|im_start|>", "<|im_end|>"), None, "<|im_end|>"),
    "mistral": Family("mistral", MISTRAL_V03, ("<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>",
                      system_in_every_rendering=False),
}
PIECES = re.compile(r"\s|\w+|[^\w\s]")


def word_tokenizer(family: Family, texts: list[str], *, size: int | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with ``family``'s template and special tokens that knows every piece (a word, a
    whitespace character, a punctuation mark) of ``texts`` and of the template's own default messages; ``size``
    pads the vocabulary with filler words to that many ids."""
    words = {"system", "user", "assistant", "\n", " "}  # the roles, which templates write from the messages
    for text in [*texts, *re.findall(r"'([^'{}]*)'", family.template)]:  # the template's literal strings too
        for special in family.specials:
            text = text.replace(special, " ")
        words.update(PIECES.findall(text))
    words -= set(family.specials)
    vocab = {token: index for index, token in enumerate(["<unk>", "<pad>", *family.specials, *sorted(words)])}
    if size is not None:
        if len(vocab) > size:
            raise ValueError(f"{family.name}: the texts need {len(vocab)} ids, more than {size}")
        vocab.update({f"w{i}": i for i in range(len(vocab), size)})
    backend = Tokenizer(token_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(PIECES.pattern), behavior="isolated")
    backend.decoder = decoders.Fuse()
    others = [s for s in family.specials if s not in (family.bos, family.eos)]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>",
                                        bos_token=family.bos, eos_token=family.eos, additional_special_tokens=others,
                                        clean_up_tokenization_spaces=False)
    tokenizer.chat_template = family.template
    return tokenizer
