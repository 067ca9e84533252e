"""Architecture facts of a decoder-only LM, enough for parallel-layout checks and memory estimates.

Facts come from a model preset (`grail.model.*` in the composed config, so no hub access is
needed) or from an HF `config.json`. Parameter counts follow the Qwen2/Llama layout that
mbridge maps onto an mcore GPTModel: GQA attention (Qwen2 has q/k/v biases), SwiGLU MLP,
RMSNorm, optional tied input/output embeddings.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class ModelSpec:
    name: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    intermediate_size: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = True
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    def layer_params(self) -> int:
        """Parameters of one transformer layer (attention + SwiGLU MLP + two RMSNorms)."""
        h, f = self.hidden_size, self.intermediate_size
        qkv = h * (h + 2 * self.kv_dim) + ((h + 2 * self.kv_dim) if self.qkv_bias else 0)
        attn_out = h * h
        mlp = 3 * h * f
        return qkv + attn_out + mlp + 2 * h

    def padded_vocab(self, tp: int) -> int:
        """Megatron pads the vocabulary to a multiple of 128 x TP."""
        multiple = 128 * tp
        return math.ceil(self.vocab_size / multiple) * multiple

    def total_params(self) -> int:
        embeddings = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * self.layer_params() + embeddings + self.hidden_size

    @classmethod
    def from_mapping(cls, facts: Any, name: str | None = None) -> "ModelSpec":
        """From a preset's `grail.model` node (or any mapping with the same keys)."""
        required = ("num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                    "vocab_size", "intermediate_size")
        missing = [k for k in required if facts.get(k) is None]
        if missing:
            raise ValueError(f"model facts are missing {', '.join('grail.model.' + k for k in missing)}")
        return cls(
            name=str(name or facts.get("name") or "model"),
            num_layers=int(facts["num_layers"]),
            hidden_size=int(facts["hidden_size"]),
            num_attention_heads=int(facts["num_attention_heads"]),
            num_key_value_heads=int(facts["num_key_value_heads"]),
            vocab_size=int(facts["vocab_size"]),
            intermediate_size=int(facts["intermediate_size"]),
            tie_word_embeddings=bool(facts.get("tie_word_embeddings", False)),
            qkv_bias=bool(facts.get("qkv_bias", True)),
            max_position_embeddings=int(facts.get("max_position_embeddings") or 32768),
        )

    @classmethod
    def from_hf_config(cls, path: str | Path) -> "ModelSpec":
        """From an HF `config.json` (or the folder holding it)."""
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise FileNotFoundError(f"no HF config.json at {path}")
        try:
            raw = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{path}: not a readable JSON HF config ({exc})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: not an HF config (a JSON object expected, got {type(raw).__name__})")
        try:
            return cls(
                name=raw.get("_name_or_path") or path.parent.name,
                num_layers=int(raw["num_hidden_layers"]),
                hidden_size=int(raw["hidden_size"]),
                num_attention_heads=int(raw["num_attention_heads"]),
                num_key_value_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
                vocab_size=int(raw["vocab_size"]),
                intermediate_size=int(raw["intermediate_size"]),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=raw.get("model_type", "qwen2") == "qwen2" or bool(raw.get("attention_bias", False)),
                max_position_embeddings=int(raw.get("max_position_embeddings") or 32768),
            )
        except KeyError as exc:
            raise ValueError(f"{path}: HF config lacks {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: HF config has a non-integer size ({exc})") from None
