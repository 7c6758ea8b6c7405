"""Evaluators, chosen by a dataset's evaluator_type in build.py."""

from __future__ import annotations

from .captioning import CaptioningEvaluator  # noqa: F401
from .coco_lvis import FastCOCOEvaluator, FastLVISEvaluator  # noqa: F401
