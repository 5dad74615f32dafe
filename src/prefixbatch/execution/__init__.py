"""Execution: model runner, models, attention backends, sampler."""
