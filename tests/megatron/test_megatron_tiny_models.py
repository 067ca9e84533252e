"""Tiny tokenizer + random-init HF models (grail_megatron.models.tiny)."""

import json

import pytest
import torch

from grail_megatron.models.tiny import EOS_TOKEN, PAD_TOKEN, make_tiny_model, train_tokenizer
from grail_megatron.prompts import GRAIL_TAGS

TEXTS = [
    f"What is {a} + {b}? <start_working_out>{a} + {b} = {a + b}</end_working_out>"
    f"<SOLUTION>{a + b}</SOLUTION>"
    for a in range(10)
    for b in range(10)
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_tokenizer(TEXTS, out)
    return out


def test_tokenizer_special_tokens_digits_and_tags(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    assert tok.eos_token == EOS_TOKEN and tok.pad_token == PAD_TOKEN
    assert tok.eos_token_id != tok.pad_token_id
    for tag in GRAIL_TAGS:  # every tag is one token
        assert len(tok(tag, add_special_tokens=False)["input_ids"]) == 1, tag
    pieces = tok.convert_ids_to_tokens(tok("12345", add_special_tokens=False)["input_ids"])
    assert pieces == ["1", "2", "3", "4", "5"]
    # tags survive decoding with skip_special_tokens (rewards parse them), eos does not
    text = "<SOLUTION>42</SOLUTION>" + EOS_TOKEN
    decoded = tok.decode(tok(text)["input_ids"], skip_special_tokens=True)
    assert decoded == "<SOLUTION>42</SOLUTION>"
    # byte-level: unseen characters round-trip
    assert tok.decode(tok("Zürich ∑ 日本")["input_ids"]) == "Zürich ∑ 日本"


def test_chat_template_generation_prompt(tok_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "What is 1 + 2?"}]
    with_prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert with_prompt == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nWhat is 1 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    without = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=False)
    assert with_prompt.startswith(without) and not without.endswith("assistant\n")


def test_tokenizer_is_deterministic(tok_dir, tmp_path):
    train_tokenizer(TEXTS, tmp_path / "again")
    a = json.loads((tok_dir / "tokenizer.json").read_text())
    b = json.loads((tmp_path / "again" / "tokenizer.json").read_text())
    assert a == b


def test_train_tokenizer_rejects_empty(tmp_path):
    with pytest.raises(ValueError, match="no non-empty texts"):
        train_tokenizer(["", ""], tmp_path / "t")


@pytest.mark.parametrize("arch,tied", [("qwen2", True), ("llama", False)])
def test_make_tiny_model_roundtrip(tok_dir, tmp_path, arch, tied):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    out = make_tiny_model(tmp_path / arch, arch=arch, tie_word_embeddings=tied,
                          tokenizer_dir=tok_dir, hidden=32, layers=2, heads=4, kv_heads=2, seed=3)
    model = AutoModelForCausalLM.from_pretrained(str(out))
    tok = AutoTokenizer.from_pretrained(str(out))
    cfg = model.config
    assert cfg.model_type == arch and cfg.vocab_size == len(tok)
    assert cfg.num_key_value_heads == 2 and cfg.tie_word_embeddings is tied
    tied_now = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tied_now is tied
    gen = GenerationConfig.from_pretrained(str(out))
    assert gen.eos_token_id == tok.eos_token_id and gen.pad_token_id == tok.pad_token_id
    # same seed -> bitwise identical weights; different seed -> different
    again = make_tiny_model(tmp_path / "again", arch=arch, tie_word_embeddings=tied,
                            tokenizer_dir=tok_dir, hidden=32, layers=2, heads=4, kv_heads=2, seed=3)
    other = AutoModelForCausalLM.from_pretrained(str(again))
    for (name, p), (_, q) in zip(model.state_dict().items(), other.state_dict().items()):
        assert torch.equal(p, q), name
    ids = torch.tensor([tok("What is 1 + 2?")["input_ids"]])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))


def test_make_tiny_model_bad_shape(tok_dir, tmp_path):
    with pytest.raises(ValueError, match="not divisible by kv_heads"):
        make_tiny_model(tmp_path / "bad", tokenizer_dir=tok_dir, heads=4, kv_heads=3)
