"""Suite-wide settings: offline, single-threaded torch per rank, no telemetry."""
import os

# Several gloo ranks share 2 cores: one thread each (10x faster than the default).
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Nothing may reach a model or dataset hub during tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# Ray gives its GCS 30 s to bind a port; a loaded 2-core machine can need more.
os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
