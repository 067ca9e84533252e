"""What verl's engine needs from mbridge 0.15.1 and megatron-core 0.18, on every device.

verl's Megatron engine (`vanilla_mbridge=true`) calls `mbridge.AutoBridge.from_config(...)`
and then `bridge.get_model(...)`. These break on this version matrix (GPU or not, unless the table says otherwise):

| name                  | what fails without it                                                     |
|-----------------------|---------------------------------------------------------------------------|
| encoder_and_decoder   | mbridge's `get_model` compares `model_type == ModelType.encoder_and_decoder`;|
|                       | megatron-core 0.18 removed that member: AttributeError on every build.    |
|                       | An alias that equals no model type restores mbridge's decoder-only path.  |
| grail_bridge_classes  | mbridge's Qwen2/Llama classes (TE-only layer spec, class-level tied-weight |
|                       | name table, `rope_theta` of transformers 4); replaced through mbridge's   |
|                       | own `register_model` by `grail_megatron.megatron.bridge.grail_mbridge_class`|

| padding_mask_local    | verl's padded (BSHD) forward passes a `[batch, seq]` padding mask and relies |
|                       | on Transformer Engine's causal attention ignoring it (verl right-pads, so   |
|                       | causal masking alone is exact for the real tokens). Megatron's local     |
|                       | `DotProductAttention` (the layer spec without TE: CPU, or a GPU without TE)|
|                       | applies it as a `[b, np, sq, sk]` mask and fails on the shape; it gets     |
|                       | `None` instead and builds the causal mask itself, as TE does.              |

| no_param_buffer       | with `use_distributed_optimizer=false` Megatron's DDP buffers have no flat |
|                       | `param_data` (None); verl's `load_megatron_model_to_gpu` (run before every  |
|                       | weight export to the rollout) and `offload_megatron_model_to_cpu` call      |
|                       | `param_data.storage()`: AttributeError on every device. Such buffers get a |
|                       | one-element stand-in for the call (their parameters are separate tensors, |
|                       | which the rest of both functions moves), then None again.                 |

| fresh_optimizer_state | without Apex/TE (CPU, a bare GPU node) Megatron's DistributedOptimizer       |
|                       | `state_dict()` asserts on a fresh torch Adam (no 'step' yet); verl calls it |
|                       | to build the template a resumed checkpoint loads into. Megatron's own dummy |
|                       | state init runs first, with lr and weight decay 0 for that step.           |

| adam_step_on_resume   | without Apex/TE (torch Adam keeps a `step` per parameter), Megatron's         |
|                       | DistributedOptimizer.load_state_dict (1) gives every parameter state the    |
|                       | *same* `step` tensor, and (2) then copies the load template's per-parameter |
|                       | `step` into it (the checkpoint stores the step in its param groups only; the |
|                       | template's is the fresh optimizer's, 1). torch's Adam then increments the   |
|                       | shared tensor once per parameter: a resume at step 2 updated with step 17   |
|                       | on the tiny model (bias correction off, fp32 weights 7.5e-5 apart after one |
|                       | update). Each state gets its own tensor holding the checkpoint's step.      |

`apply()` is idempotent and runs in each process that builds verl's Megatron engine (our workers'
constructors, grail_megatron/workers/trainer.py); tests/workers/test_verl_adjustments.py shows
each failure.
"""

from __future__ import annotations

import contextlib
import functools

ALIAS = "encoder_and_decoder"


class _NoModelType:
    """Equal to no `ModelType` member: mbridge's encoder-decoder branches are never taken."""

    def __repr__(self) -> str:
        return "ModelType.encoder_and_decoder (removed in megatron-core 0.18; grail_megatron alias)"


def add_encoder_and_decoder_alias() -> bool:
    """Give `ModelType` the attribute mbridge reads; returns True if it was missing."""
    from megatron.core.transformer.enums import ModelType  # the class mbridge reads (via gpt_model)

    if hasattr(ModelType, ALIAS):
        return False
    # Enum classes accept new non-member attributes; members cannot be added after creation.
    setattr(ModelType, ALIAS, _NoModelType())
    return True


def remove_encoder_and_decoder_alias() -> None:
    """Undo the alias (tests that show the failure it prevents)."""
    from megatron.core.transformer.enums import ModelType  # the class mbridge reads (via gpt_model)

    if isinstance(getattr(ModelType, ALIAS, None), _NoModelType):
        delattr(ModelType, ALIAS)


_original_local_attention_forward = None


def _causal_local_attention_forward(self, query, key, value, attention_mask, *args, **kwargs):
    from megatron.core.transformer.enums import AttnMaskType

    mask_type = kwargs.get("attn_mask_type") or (args[0] if args else None) or self.attn_mask_type
    if attention_mask is not None and attention_mask.dim() == 2 and mask_type == AttnMaskType.causal:
        attention_mask = None  # a [batch, seq] padding mask of a right-padded batch: causal is exact
    return _original_local_attention_forward(self, query, key, value, attention_mask, *args, **kwargs)


def ignore_padding_mask_in_local_causal_attention() -> bool:
    global _original_local_attention_forward
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if _original_local_attention_forward is not None:
        return False
    _original_local_attention_forward = DotProductAttention.forward
    DotProductAttention.forward = _causal_local_attention_forward
    return True


def restore_local_attention() -> None:
    global _original_local_attention_forward
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    if _original_local_attention_forward is not None:
        DotProductAttention.forward = _original_local_attention_forward
        _original_local_attention_forward = None


_original_buffer_movers: dict[str, object] = {}
BUFFER_MOVERS = ("load_megatron_model_to_gpu", "offload_megatron_model_to_cpu")


def _ddp_buffers_without_param_data(models):
    from megatron.core.distributed import DistributedDataParallel

    for chunk in models:
        if isinstance(chunk, DistributedDataParallel):
            for buffers in (chunk.buffers, chunk.expert_parallel_buffers):
                yield from (b for b in buffers if getattr(b, "param_data", 0) is None)


def _with_param_data_stand_in(mover):
    @functools.wraps(mover)
    def wrapper(models, *args, **kwargs):
        import torch

        missing = list(_ddp_buffers_without_param_data(models))
        for buffer in missing:
            buffer.param_data = torch.zeros(1)  # storage size 1: "loaded", nothing to copy
        try:
            return mover(models, *args, **kwargs)
        finally:
            for buffer in missing:
                buffer.param_data = None

    wrapper.__grail_stand_in__ = True
    return wrapper


def tolerate_missing_param_buffers() -> bool:
    """verl's engine module imported both movers by name: wrap them there."""
    from verl.workers.engine.megatron import transformer_impl

    if _original_buffer_movers:
        return False
    for name in BUFFER_MOVERS:
        _original_buffer_movers[name] = getattr(transformer_impl, name)
        setattr(transformer_impl, name, _with_param_data_stand_in(_original_buffer_movers[name]))
    return True


def restore_param_buffer_movers() -> None:
    from verl.workers.engine.megatron import transformer_impl

    for name, original in _original_buffer_movers.items():
        setattr(transformer_impl, name, original)
    _original_buffer_movers.clear()


# DistributedOptimizer methods replaced without Apex/TE (torch Adam inside), by name
_ORIGINAL_OPTIMIZER_METHODS: dict = {}


def _replace_optimizer_method(name: str, replacement) -> bool:
    from megatron.core.optimizer import distrib_optimizer

    if name in _ORIGINAL_OPTIMIZER_METHODS or distrib_optimizer.HAVE_APEX_OR_TE:
        return False
    _ORIGINAL_OPTIMIZER_METHODS[name] = getattr(distrib_optimizer.DistributedOptimizer, name)
    setattr(distrib_optimizer.DistributedOptimizer, name, replacement)
    return True


def _restore_optimizer_method(name: str) -> None:
    from megatron.core.optimizer import distrib_optimizer

    if name in _ORIGINAL_OPTIMIZER_METHODS:
        setattr(distrib_optimizer.DistributedOptimizer, name, _ORIGINAL_OPTIMIZER_METHODS.pop(name))


def _state_dict_of_a_fresh_optimizer(self):
    """Megatron's state_dict, after giving a fresh torch Adam its state (lr and weight decay 0 for
    that one step, so no parameter moves); the checkpoint being loaded then replaces it."""
    if len(self.optimizer.state) == 0:
        saved = [(group.get("lr"), group.get("weight_decay")) for group in self.optimizer.param_groups]
        for group in self.optimizer.param_groups:
            group["lr"], group["weight_decay"] = 0.0, 0.0
        try:
            self._init_optimizer_states_with_dummy_values()  # Megatron's own (zero grads, one step)
        finally:
            for group, (lr, weight_decay) in zip(self.optimizer.param_groups, saved):
                group["lr"], group["weight_decay"] = lr, weight_decay
    return _ORIGINAL_OPTIMIZER_METHODS["state_dict"](self)


def give_fresh_optimizers_a_state() -> bool:
    """Without Apex/TE, Megatron's DistributedOptimizer.state_dict reads the inner torch Adam's
    'step', which a fresh Adam does not have yet (`assert len(steps) == 1`); verl calls it on the
    fresh optimizer to build the template a resumed checkpoint is loaded into."""
    return _replace_optimizer_method("state_dict", _state_dict_of_a_fresh_optimizer)


def restore_optimizer_state_dict() -> None:
    _restore_optimizer_method("state_dict")


def _load_state_dict_with_own_steps(self, state_dict):
    """Megatron's load_state_dict, then the checkpoint's step (its param groups') in a tensor of
    each parameter state's own."""
    import torch

    _ORIGINAL_OPTIMIZER_METHODS["load_state_dict"](self, state_dict)
    steps = {float(group["step"]) for group in state_dict["optimizer"]["param_groups"] if "step" in group}
    if len(steps) != 1:
        return
    step = steps.pop()
    for state in self.optimizer.state.values():
        if "step" in state:
            state["step"] = torch.tensor(step, dtype=torch.float32)


def give_adam_states_their_own_steps() -> bool:
    return _replace_optimizer_method("load_state_dict", _load_state_dict_with_own_steps)


def restore_optimizer_load_state_dict() -> None:
    _restore_optimizer_method("load_state_dict")


def apply() -> None:
    from grail_megatron.megatron.bridge import register_with_mbridge

    add_encoder_and_decoder_alias()
    register_with_mbridge()
    ignore_padding_mask_in_local_causal_attention()
    tolerate_missing_param_buffers()
    give_fresh_optimizers_a_state()
    give_adam_states_their_own_steps()


def restore_mbridge_classes() -> None:
    """Put mbridge's own classes back in its registry (tests that show what ours fix)."""
    from mbridge.core.bridge import register_model

    from grail_megatron.megatron.bridge import SUPPORTED_MODEL_TYPES, _mbridge_class

    for model_type in SUPPORTED_MODEL_TYPES:
        register_model(model_type)(_mbridge_class(model_type))


def _register_grail_classes() -> None:
    from grail_megatron.megatron.bridge import register_with_mbridge

    register_with_mbridge()


# name -> (apply, undo); the names of the module docstring's table
PARTS = {
    "encoder_and_decoder": (add_encoder_and_decoder_alias, remove_encoder_and_decoder_alias),
    "grail_bridge_classes": (_register_grail_classes, restore_mbridge_classes),
    "padding_mask_local": (ignore_padding_mask_in_local_causal_attention, restore_local_attention),
    "no_param_buffer": (tolerate_missing_param_buffers, restore_param_buffer_movers),
    "fresh_optimizer_state": (give_fresh_optimizers_a_state, restore_optimizer_state_dict),
    "adam_step_on_resume": (give_adam_states_their_own_steps, restore_optimizer_load_state_dict),
}


@contextlib.contextmanager
def without(name: str):
    """Undo one part of `apply()` for the duration (diagnostics and the tests that show why it
    exists); it is applied again on exit."""
    if name not in PARTS:
        raise ValueError(f"unknown mbridge adjustment {name!r}; known: {list(PARTS)}")
    redo, undo = PARTS[name]
    undo()
    try:
        yield
    finally:
        redo()
