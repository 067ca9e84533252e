"""Our one interface between Hugging Face checkpoints and megatron-core GPT models.

Backed by mbridge 0.15.1 (verl's `vanilla_mbridge` path). Megatron-Bridge, verl's default,
cannot be installed next to megatron-core 0.18.0 (docs/megatron.md has the evidence), so it is
not used; switching later means reimplementing this class, nothing else.

What this class adds on top of mbridge (each is small and needed on this stack):
- The layer spec: Transformer Engine's on a GPU (as mbridge), Megatron's local spec on CPU.
  The local spec keeps the layer norms as separate modules (`input_layernorm`,
  `pre_mlp_layernorm`) instead of fusing them into the next linear layer, so their names are
  mapped here.
- Model chunks are built here (Megatron's own recipe) rather than by `mbridge.get_model`,
  which moves modules with `.cuda()`, wraps fp32 models in Float16Module and reads
  `ModelType.encoder_and_decoder`, removed in megatron-core 0.18.
- Tied embeddings: mbridge rewrites a *class-level* name table when a tied Qwen2 is built
  (so a later untied Qwen2 in the same process would export its lm_head under the wrong
  name) and does not handle tied Llama; the table is per instance here.
- `rope_theta` is read from `rope_parameters` when transformers 5 no longer exposes it.
- Saving HF weights works for a model that was not loaded from HF weights (verl initialising
  from a Megatron dist checkpoint): mbridge's writer is created on demand.
- The vocabulary is padded to a multiple of TP (times `vocab_multiple`); the padded rows are
  zero; the exported HF tensors leave them out.
- Export de-duplicates tied weights (with PP>1 the first and last stage both hold them).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

# HF weight names of the layer norms that the local (non-TE) spec keeps as separate modules.
_LOCAL_SPEC_NORMS = {
    "input_layernorm.weight": "model.layers.{n}.input_layernorm.weight",
    "pre_mlp_layernorm.weight": "model.layers.{n}.post_attention_layernorm.weight",
}
SUPPORTED_MODEL_TYPES = ("qwen2", "llama")


@dataclass(frozen=True)
class BridgeConfig:
    """How to build the Megatron model from an HF config."""

    dtype: torch.dtype = torch.float32
    use_te: bool | None = None  # None: TE spec on GPU, local spec on CPU
    vocab_multiple: int = 1  # vocab is padded to a multiple of vocab_multiple * TP
    sequence_parallel: bool | None = None  # None: on with TP>1 on GPU, off on CPU
    recompute: bool = False  # full activation recomputation (memory for compute)
    extra: dict = field(default_factory=dict)  # any further TransformerConfig fields


_ORIGINAL_MBRIDGE_CLASSES: dict[str, type] = {}
_GRAIL_MBRIDGE_CLASSES: dict[str, type] = {}


def _mbridge_class(model_type: str):
    """mbridge's own class for `model_type` (as registered by mbridge, before our registration)."""
    import mbridge.models  # noqa: F401  (registers the model classes)
    from mbridge.core.bridge import _MODEL_REGISTRY

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(
            f"model_type {model_type!r} is not supported (supported: {list(SUPPORTED_MODEL_TYPES)})"
        )
    return _ORIGINAL_MBRIDGE_CLASSES.setdefault(model_type, _MODEL_REGISTRY[model_type])


def _ensure_rope_theta(hf_config) -> None:
    """mbridge reads `hf_config.rope_theta`; transformers 5 keeps it in `rope_parameters`."""
    if getattr(hf_config, "rope_theta", None) is None:
        params = getattr(hf_config, "rope_parameters", None) or {}
        if "rope_theta" not in params:
            raise ValueError("HF config has neither rope_theta nor rope_parameters['rope_theta']")
        hf_config.rope_theta = params["rope_theta"]


def grail_mbridge_class(model_type: str) -> type:
    """mbridge's class for `model_type` with the fixes this stack needs (module docstring).

    One class per architecture, used by our `Bridge` and, through mbridge's own
    `register_model` (see `register_with_mbridge`), by verl's Megatron engine
    (`vanilla_mbridge=true`). `use_te=None` picks Transformer Engine's layer spec on a GPU (what
    mbridge always does) and Megatron's local spec without one.
    """
    if model_type in _GRAIL_MBRIDGE_CLASSES:
        return _GRAIL_MBRIDGE_CLASSES[model_type]
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    base = _mbridge_class(model_type)

    class GrailMBridge(base):
        use_te: bool | None = None

        def __init__(self, hf_config, *args, **kwargs):
            _ensure_rope_theta(hf_config)
            super().__init__(hf_config, *args, **kwargs)

        def _tied(self) -> bool:
            return bool(getattr(self.hf_config, "tie_word_embeddings", False))

        def _adjust_mapping_for_shared_weights(self):
            # per instance (mbridge mutates the class attribute)
            self._DIRECT_MAPPING = dict(base._DIRECT_MAPPING)
            self._DIRECT_MAPPING["output_layer.weight"] = (
                "model.embed_tokens.weight" if self._tied() else "lm_head.weight"
            )

        def _get_hf_shared_weight_keys(self):
            return ["model.embed_tokens.weight"] if self._tied() else []

        def _get_transformer_layer_spec(self, vp_stage=None):
            self.has_vp_stage = True
            use_te = _te_usable() if self.use_te is None else self.use_te
            return get_gpt_decoder_block_spec(self.config, use_transformer_engine=use_te, vp_stage=vp_stage)

        def save_weights(self, models, weights_path, memory_efficient=False):
            # mbridge creates its safetensors writer when it *loads* HF weights; a model that verl
            # initialised from a Megatron dist checkpoint (use_dist_checkpointing=true, our GPU
            # recipe) never did, and verl's HF save ('hf_model' in save_contents) raised
            # AttributeError on None. A writer without an index writes one model.safetensors.
            if self.safetensor_io is None:
                from mbridge.core.safetensor_io import SafeTensorIO

                self.safetensor_io = SafeTensorIO(str(weights_path))
            return super().save_weights(models, weights_path, memory_efficient=memory_efficient)

        def _weight_name_mapping_mcore_to_hf(self, name):
            # only the local spec has these modules; TE's spec fuses the norms into the linears
            for suffix, hf_name in _LOCAL_SPEC_NORMS.items():
                if name.startswith("decoder.layers.") and name.endswith(suffix):
                    return [hf_name.format(n=name.split(".")[2])]
            return super()._weight_name_mapping_mcore_to_hf(name)

    GrailMBridge.__name__ = GrailMBridge.__qualname__ = f"Grail{base.__name__}"
    _GRAIL_MBRIDGE_CLASSES[model_type] = GrailMBridge
    return GrailMBridge


def _te_usable() -> bool:
    """Transformer Engine's layer spec needs a GPU *and* TE (a bare GPU node may lack TE)."""
    from megatron.core.models.gpt.gpt_layer_specs import HAVE_TE

    return torch.cuda.is_available() and bool(HAVE_TE)


def register_with_mbridge() -> None:
    """Make `mbridge.AutoBridge` (which verl's engine calls) build our classes. Idempotent."""
    from mbridge.core.bridge import register_model

    for model_type in SUPPORTED_MODEL_TYPES:
        register_model(model_type)(grail_mbridge_class(model_type))


def _make_mbridge(hf_config, cfg: BridgeConfig, use_te: bool):
    """Instantiate our mbridge class for this architecture."""
    mb = grail_mbridge_class(hf_config.model_type)(
        hf_config, dtype=cfg.dtype, make_vocab_size_divisible_by=cfg.vocab_multiple * _tp_size()
    )
    mb.use_te = use_te
    return mb


def _tp_size() -> int:
    from megatron.core import parallel_state

    return parallel_state.get_tensor_model_parallel_world_size()


class Bridge:
    """Build, load and export Megatron GPT models for one HF architecture.

    Requires `parallel.initialize(...)` first (TP/PP come from Megatron's parallel state).

        bridge = Bridge.from_pretrained(hf_dir)
        models = bridge.build_models()          # list of chunks (one per VPP stage)
        bridge.load_hf_weights(models, hf_dir)
        for name, tensor in bridge.export_hf_weights(models): ...  # full HF tensors, every rank
    """

    def __init__(self, hf_config, config: BridgeConfig | None = None):
        self.config = config or BridgeConfig()
        self.hf_config = hf_config
        _ensure_rope_theta(hf_config)
        gpu = torch.cuda.is_available()
        self.use_te = gpu if self.config.use_te is None else self.config.use_te
        self._mb = _make_mbridge(hf_config, self.config, self.use_te)
        self._mb.set_extra_args(**self._transformer_overrides(gpu))
        self._mb.config.finalize_model_grads_func = None

    @classmethod
    def from_pretrained(cls, hf_dir: str | os.PathLike, config: BridgeConfig | None = None):
        from transformers import AutoConfig

        hf_dir = Path(hf_dir)
        if not (hf_dir / "config.json").is_file():
            raise FileNotFoundError(f"{hf_dir}/config.json not found (not an HF model folder)")
        return cls(AutoConfig.from_pretrained(str(hf_dir)), config)

    def _transformer_overrides(self, gpu: bool) -> dict:
        tp = _tp_size()
        sp = self.config.sequence_parallel
        if sp is None:
            sp = gpu and tp > 1
        overrides = dict(
            sequence_parallel=sp,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            batch_p2p_comm=False,
        )
        if not gpu:
            # no fused CUDA kernels and weights initialised on the host
            overrides.update(
                use_cpu_initialization=True,
                masked_softmax_fusion=False,
                bias_activation_fusion=False,
                bias_dropout_fusion=False,
                apply_rope_fusion=False,
                gradient_accumulation_fusion=False,
                persist_layer_norm=False,
            )
        if self.config.recompute:
            overrides.update(recompute_granularity="full", recompute_method="uniform",
                             recompute_num_layers=1)
        overrides.update(self.config.extra)
        return overrides

    # ----------------------------------------------------------------- properties
    @property
    def transformer_config(self):
        """The megatron `TransformerConfig` the models are built with."""
        return self._mb.config

    @property
    def vocab_size(self) -> int:
        return int(self.hf_config.vocab_size)

    @property
    def padded_vocab_size(self) -> int:
        multiple = self.config.vocab_multiple * _tp_size()
        return -(-self.vocab_size // multiple) * multiple

    # ----------------------------------------------------------------- building
    def build_models(self, wrap_with_ddp: bool = False, ddp_config=None) -> list[torch.nn.Module]:
        """Model chunks of this PP rank (one, or `vpp` with virtual pipeline stages).

        With `wrap_with_ddp` each chunk is wrapped in Megatron's DistributedDataParallel
        (needed by Megatron's optimizer and `finalize_model_grads`).
        """
        from megatron.core import parallel_state as ps
        from megatron.core import tensor_parallel
        from megatron.core.enums import ModelType

        provider = self._mb._model_provider([])
        vpp = ps.get_virtual_pipeline_model_parallel_world_size()
        models = []
        for stage in range(vpp or 1):
            stage_arg = stage if vpp else None
            model = provider(
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage_arg),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage_arg),
                vp_stage=stage_arg,
            )
            model.model_type = ModelType.encoder_or_decoder
            model.vp_stage = stage_arg
            for param in model.parameters():
                tensor_parallel.set_defaults_if_not_set_tensor_model_parallel_attributes(param)
            if torch.cuda.is_available():
                model.cuda(torch.cuda.current_device())
            models.append(model)
        if self._mb.padded_vocab_size != self.padded_vocab_size:
            raise AssertionError("vocab padding disagrees with mbridge")
        if self.config.dtype in (torch.bfloat16, torch.float16):
            # Megatron's half-precision recipe: the wrapper casts inputs and fp32 outputs
            from megatron.core.transformer.module import Float16Module

            models = [Float16Module(self.transformer_config, m) for m in models]
        if wrap_with_ddp:
            models = self._wrap_ddp(models, ddp_config)
        return models

    def _wrap_ddp(self, models, ddp_config):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

        ddp_config = ddp_config or DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, overlap_grad_reduce=False, use_distributed_optimizer=False
        )
        return [
            DistributedDataParallel(
                config=self.transformer_config, ddp_config=ddp_config, module=m,
                disable_bucketing=i > 0,
            )
            for i, m in enumerate(models)
        ]

    # ----------------------------------------------------------------- weights
    def load_hf_weights(self, models: list[torch.nn.Module], hf_dir: str | os.PathLike) -> None:
        """Load HF safetensors (any TP/PP; TP rank 0 reads, scatters to its TP group)."""
        hf_dir = str(hf_dir)
        if not list(Path(hf_dir).glob("*.safetensors")):
            raise FileNotFoundError(f"no *.safetensors files in {hf_dir}")
        with torch.no_grad():
            self._mb.load_weights([unwrap(m) for m in models], hf_dir)

    def export_hf_weights(self, models: list[torch.nn.Module]) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, full tensor) for every weight, gathered across TP and PP.

        Collective: every rank of the model-parallel group must iterate it to the end.
        Every rank receives every tensor (vocab padding removed); tied weights appear once.
        """
        seen = set()
        with torch.no_grad():
            for name, tensor in self._mb.export_weights([unwrap(m) for m in models]):
                if name in seen:
                    continue
                seen.add(name)
                yield name, tensor

    def hf_names_of(self, mcore_name: str) -> list[str]:
        """The HF tensor names one (full, unsharded) mcore tensor maps to."""
        return list(self._mb._weight_name_mapping_mcore_to_hf(mcore_name))

    def mcore_to_hf(self, mcore_name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Map one full mcore tensor to its HF tensors (QKV and gate/up are split here).

        The offline converter uses this on tensors read from a dist checkpoint; vocab padding
        is left to the caller, who knows the padding of the job that saved them.
        """
        names, tensors = self._mb._weight_to_hf_format(mcore_name, tensor)
        return list(zip(names, tensors))

    def export_state_dict(self, models) -> dict[str, torch.Tensor]:
        """All HF tensors as a dict (cloned, on CPU)."""
        return {name: t.detach().to("cpu", copy=True) for name, t in self.export_hf_weights(models)}

    def save_hf(self, models, out_dir: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                dtype: torch.dtype | None = None) -> Path | None:
        """Write an HF folder (config, safetensors, tokenizer files) from global rank 0.

        Collective (all ranks call it); writes to a temp folder and renames it into place.
        Returns the path on rank 0, None elsewhere.
        """
        from safetensors.torch import save_file

        state = {}
        for name, tensor in self.export_hf_weights(models):
            state[name] = tensor.detach().to("cpu", dtype=dtype or tensor.dtype).contiguous()
        if torch.distributed.get_rank() != 0:
            return None
        out_dir = Path(out_dir)
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".hf-", dir=out_dir.parent))
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        self.hf_config.save_pretrained(str(tmp))
        if tokenizer_dir is not None:
            _copy_tokenizer_files(Path(tokenizer_dir), tmp)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        return out_dir


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                    "chat_template.jinja", "generation_config.json", "vocab.json", "merges.txt")


def _copy_tokenizer_files(src: Path, dst: Path) -> None:
    for name in _TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """Strip DDP / Float16Module wrappers."""
    while hasattr(model, "module") and not hasattr(model, "decoder"):
        model = model.module
    return model


def hf_config_summary(hf_config) -> str:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "vocab_size", "tie_word_embeddings")
    return json.dumps({k: getattr(hf_config, k, None) for k in keys})
