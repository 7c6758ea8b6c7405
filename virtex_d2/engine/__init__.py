"""Trainer and training utilities."""
