"""grail-megatron: GRPO with GRAIL's rewards on verl's Megatron-LM backend."""

__version__ = "0.1.0"
