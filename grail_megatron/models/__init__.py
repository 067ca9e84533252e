"""Tiny random-init Hugging Face models and a locally trained tokenizer (tests, smoke run)."""
