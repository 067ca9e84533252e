"""`python -m grail_megatron.cli ...` is the `grail-megatron` command."""
import sys

from grail_megatron.cli import main

sys.exit(main())
