"""Which torch device a program runs on: the one place both the consumer and the trainer ask."""

from __future__ import annotations

import logging
from typing import Literal

import torch

log = logging.getLogger("stampstream.model")

DevicePreference = Literal["auto", "cpu", "cuda"]


def select_device(preference: str) -> torch.device:
    """auto: cuda when torch sees a GPU, else cpu. 'cuda' without a GPU falls back to cpu with a warning."""
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        log.warning("device: cuda requested but no CUDA device is available; running on cpu")
    return torch.device("cpu")
