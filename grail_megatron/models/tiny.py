"""Tiny random-init Hugging Face models and a locally trained tokenizer.

No pretrained model or tokenizer can be downloaded on the build machines, so the tests and
the CPU smoke run use a byte-level BPE trained on the fixture texts and a few-hundred-thousand
parameter Qwen2 / Llama model saved as an ordinary HF folder (config, generation config,
safetensors, tokenizer). Everything is deterministic for a given input and seed.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Literal

from grail_megatron.prompts import GRAIL_TAGS

# Qwen-style chat markers. `<|im_end|>` ends every turn and is the EOS of generation;
# `<|endoftext|>` pads. The GRAIL tags are atomic added tokens that are NOT "special" in the
# decoding sense, so `decode(..., skip_special_tokens=True)` keeps them (the rewards parse them).
IM_START = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = (PAD_TOKEN, IM_START, EOS_TOKEN)

# Qwen2-like ChatML template: system/user/assistant turns, optional generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)

Arch = Literal["qwen2", "llama"]


def _atomic_replace_dir(tmp_dir: Path, out_dir: Path) -> None:
    """Move a fully written temp folder into place (replacing an older one)."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)


def train_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike, vocab_size: int = 320):
    """Train a byte-level BPE on `texts` and save it as a HF tokenizer folder in `out_dir`.

    Digits are split individually (so numbers are learnable digit by digit), the GRAIL tags
    and the chat markers are single tokens, and the chat template is saved with it.
    Returns the loaded `PreTrainedTokenizerFast`. Deterministic for the same `texts`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_tokenizer: no non-empty texts to train on")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_tokens([AddedToken(tag, normalized=False, special=False) for tag in GRAIL_TAGS])

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        padding_side="left",  # generation batches are left padded
        model_max_length=4096,
    )
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tok-", dir=out_dir.parent))
    hf_tok.save_pretrained(tmp)
    _atomic_replace_dir(tmp, out_dir)
    return load_tokenizer(out_dir)


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def tiny_config(
    arch: Arch,
    vocab_size: int,
    *,
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int | None,
    tie_word_embeddings: bool,
    eos_token_id: int,
    pad_token_id: int,
    bos_token_id: int,
    max_position_embeddings: int = 2048,
    dtype: str = "float32",
):
    """HF config of a tiny Qwen2 or Llama (GQA when kv_heads < heads)."""
    from transformers import LlamaConfig, Qwen2Config

    if hidden % heads:
        raise ValueError(f"hidden={hidden} is not divisible by heads={heads}")
    if heads % kv_heads:
        raise ValueError(f"heads={heads} is not divisible by kv_heads={kv_heads}")
    common = dict(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate or 2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos_token_id,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        initializer_range=0.02,
        dtype=dtype,
    )
    if arch == "qwen2":
        return Qwen2Config(**common, use_sliding_window=False)
    if arch == "llama":
        return LlamaConfig(**common, attention_bias=False, mlp_bias=False)
    raise ValueError(f"arch must be 'qwen2' or 'llama', got {arch!r}")


def make_tiny_model(
    out_dir: str | os.PathLike,
    arch: Arch = "qwen2",
    tie_word_embeddings: bool = True,
    tokenizer_dir: str | os.PathLike | None = None,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
    vocab_size: int | None = None,
) -> Path:
    """Save a random-init HF causal LM (+ tokenizer) to `out_dir` and return the path.

    `tokenizer_dir` is a folder written by `train_tokenizer`; the model's vocabulary is
    the tokenizer's, or `vocab_size` rows when given (>= the tokenizer's; real checkpoints such
    as Qwen2 carry unused rows too). The Megatron bridge pads it for tensor parallelism.
    DESIGN.md section 8's learnable size: hidden=128, intermediate=256, layers=2, heads=4,
    kv_heads=2.
    """
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    if tokenizer_dir is None:
        raise ValueError("make_tiny_model needs tokenizer_dir (see train_tokenizer)")
    tokenizer = load_tokenizer(tokenizer_dir)
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    pad_id = tokenizer.convert_tokens_to_ids(PAD_TOKEN)
    vocab_size = vocab_size or len(tokenizer)
    if vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size={vocab_size} is smaller than the tokenizer ({len(tokenizer)})")
    config = tiny_config(
        arch,
        vocab_size,
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        tie_word_embeddings=tie_word_embeddings,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=pad_id,  # as Qwen2: no BOS is prepended; bos id = <|endoftext|>
        dtype=dtype,
    )
    torch_dtype = getattr(torch, dtype)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
    generation = GenerationConfig(
        eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=pad_id, do_sample=True
    )

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".model-", dir=out_dir.parent))
    model.save_pretrained(tmp)
    generation.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _atomic_replace_dir(tmp, out_dir)
    return out_dir


def describe(model_dir: str | os.PathLike) -> dict:
    """Small summary of a saved tiny model (used in logs and docs)."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    keys = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "tie_word_embeddings")
    return {k: config.get(k) for k in keys}
