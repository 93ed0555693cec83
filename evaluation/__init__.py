"""Evaluation: the exact-score Gaussian-mixture kit, metrics and the judge."""
