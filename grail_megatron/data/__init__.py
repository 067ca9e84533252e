"""Dataset preparation: GSM8K, MATH and MBPP to verl parquet files with GRAIL's splits."""

from grail_megatron.data.errors import DataError
from grail_megatron.data.prepare import PrepareResult, SplitReport, prepare_dataset

__all__ = ["DataError", "PrepareResult", "SplitReport", "prepare_dataset"]
