"""Evaluation with GRAIL's k-metrics: pass@k (unbiased), mean@k, best@k, reward and success rates.

`metrics` holds the pure metric functions, `validation.evaluate` the in-training validation
(`val/` metrics), `runner`/`cli` the standalone `grail-megatron eval`.
"""

from grail_megatron.eval.metrics import SUCCESS_THRESHOLDS, best_at_k, mean_at_k, pass_at_k, summarize
from grail_megatron.eval.validation import evaluate

__all__ = ["SUCCESS_THRESHOLDS", "best_at_k", "evaluate", "mean_at_k", "pass_at_k", "summarize"]
