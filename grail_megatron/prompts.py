"""GRAIL's tags and system prompt (DESIGN.md section 6), shared by data, rewards and eval."""

REASONING_START = "<start_working_out>"
REASONING_END = "</end_working_out>"
SOLUTION_START = "<SOLUTION>"
SOLUTION_END = "</SOLUTION>"

GRAIL_TAGS = (REASONING_START, REASONING_END, SOLUTION_START, SOLUTION_END)

SYSTEM_PROMPT = (
    "You are given a problem.\n"
    "Think about the problem and provide your working out.\n"
    f"Place it between {REASONING_START} and {REASONING_END}.\n"
    f"Then, provide your solution between {SOLUTION_START}{SOLUTION_END}."
)

# data_source values written by `grail-megatron prepare-data`; rewards route on substrings.
DATA_SOURCES = {"gsm8k": "grail_gsm8k", "math": "grail_math", "mbpp": "grail_mbpp"}
