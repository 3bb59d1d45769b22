"""Scheduling layer: the bounded pair queue, the dynamic batcher, and the tokenizer pool."""
