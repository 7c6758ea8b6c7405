"""Evaluators, chosen by a dataset's evaluator_type in build.py."""
