"""Which torch device a program runs on: the one place both the consumer and the trainer ask."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # torch is imported when a device is chosen: a torch-free consumer never does
    import torch

log = logging.getLogger("stampstream.model")

DevicePreference = Literal["auto", "cpu", "cuda"]
CpuPrecision = Literal["auto", "fp32", "bf16"]

# CPU features with native bfloat16 arithmetic (oneDNN uses them under torch.autocast): elsewhere
# bf16 is emulated and slower than fp32.
_NATIVE_BF16 = ("avx512_bf16", "amx_bf16")


def select_device(preference: str) -> torch.device:
    """auto: cuda when torch sees a GPU, else cpu. 'cuda' without a GPU falls back to cpu with a warning."""
    import torch

    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        log.warning("device: cuda requested but no CUDA device is available; running on cpu")
    return torch.device("cpu")


def cpu_flags(cpuinfo: str) -> set[str]:
    """The ``flags`` of /proc/cpuinfo's text (first processor)."""
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_bf16(preference: str, flags: set[str] | None = None) -> bool:
    """Whether CPU inference runs under bfloat16 autocast: 'bf16' always, 'fp32' never, 'auto'
    where the CPU has native bf16 (docs/benchmarks.md: 1.7x faster there, same classes on 99.95 %
    of alerts, embedding cosine >= 0.9997 against fp32)."""
    if preference != "auto":
        return preference == "bf16"
    if flags is None:
        try:
            with open("/proc/cpuinfo") as f:
                flags = cpu_flags(f.read())
        except OSError:  # not Linux: stay with the reference
            flags = set()
    return any(f in flags for f in _NATIVE_BF16)
