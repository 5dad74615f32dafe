"""Scheduling: sequences, KV blocks and the per-step batches."""
