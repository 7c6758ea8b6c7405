"""Trainer and launcher shared by pretraining and downstream fine-tuning."""

from __future__ import annotations

from .launch import launch  # noqa: F401
from .trainer import Trainer  # noqa: F401
