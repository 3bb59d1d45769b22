"""Scheduling layer: the bounded pair queue and the dynamic batcher in front of the engine."""
