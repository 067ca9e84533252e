"""megatron-core model layer: CPU support, parallel init, HF bridge, log-probs, actor.

Submodules are imported explicitly (`from grail_megatron.megatron import parallel`) so that
importing this package stays cheap; see docs/megatron.md.
"""
