"""Batched inference with the model bundle, on CUDA when there is one, and hot reload of the bundle.

The runner checks the bundle file's (mtime, size, inode) every ``reload_check_s`` between batches;
a changed file is loaded and checked (model/bundle.py) before it replaces the running model, so a
broken or half-written file never stops the stream: the old model keeps running and the failure
is logged and counted.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from model.bundle import Bundle, BundleError, load_bundle
from model.classifier import StampClassifier
from model.preprocess import normalise

log = logging.getLogger("stampstream.inference")


def select_device(preference: str) -> torch.device:
    """auto: cuda when torch sees a GPU, else cpu. 'cuda' without a GPU falls back to cpu with a warning."""
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        return torch.device("cuda")
    if preference == "cuda":
        log.warning("device: cuda requested but no CUDA device is available; running on cpu")
    return torch.device("cpu")


def inference_threads(configured: int) -> int:
    """torch's CPU threads: the configured number, or (0) the usable CPUs minus one for the main
    thread, at least 1."""
    if configured > 0:
        return configured
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(1, cpus - 1)


def frozen_for_cpu(model: StampClassifier) -> torch.nn.Module:
    """The model traced and frozen for CPU inference, or the model itself if that fails.

    Freezing folds the weights into the graph and lets oneDNN fuse each convolution with its ReLU
    (torch.jit.optimize_for_inference): about 15 % less CPU per alert on the benchmark machine,
    results equal up to float rounding. The frozen graph is checked against the eager model on a
    few stamps of two batch sizes before it is used, so a torch release that traces differently
    costs speed, never correctness."""
    probes = [torch.rand(n, 2, 21, 21).contiguous(memory_format=torch.channels_last) for n in (5, 3)]
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer warnings about Python values: checked below
            frozen = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(model.eval(), probes[0])))
            for x in probes:
                for a, b in zip(model(x), frozen(x), strict=True):
                    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
                        raise ValueError("frozen model's outputs differ from the eager model's")
    except Exception as e:  # any tracing failure: keep the eager model, which is always correct
        log.warning("CPU inference runs the eager model (freezing failed: %s)", e)
        return model
    return frozen


def _file_signature(path: str) -> tuple[float, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_mtime, st.st_size, st.st_ino)


@dataclass(frozen=True)
class ReloadOutcome:
    changed: bool
    ok: bool
    message: str = ""


class ModelRunner:
    def __init__(
        self,
        bundle_path: str,
        device: str = "auto",
        tta_override: bool | None = None,
        reload_check_s: float = 10.0,
    ) -> None:
        self.bundle_path = bundle_path
        self.device = select_device(device)
        self.tta_override = tta_override
        self.reload_check_s = reload_check_s
        self._signature = _file_signature(bundle_path)
        self.bundle = load_bundle(bundle_path)
        self.model = self._build(self.bundle)
        self._last_check = time.monotonic()
        self.reload_failures = 0
        self.last_reload_error = ""

    def _build(self, bundle: Bundle) -> torch.nn.Module:
        # channels_last: oneDNN's (CPU) and cuDNN's fast layout for these small convolutions
        # (1.5x on the CPU benchmark); results are the same up to float rounding.
        model = bundle.build(self.device).to(memory_format=torch.channels_last)
        if self.tta_override is not None:
            model.tta_dihedral = self.tta_override
        return frozen_for_cpu(model) if self.device.type == "cpu" else model

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bundle.class_names

    def predict(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(N, 2, 21, 21) raw crops -> (embeddings (N, latent), probabilities (N, classes)), float32."""
        x = torch.from_numpy(normalise(raw)).contiguous(memory_format=torch.channels_last)
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        with torch.inference_mode():
            z, p = self.model(x)
        return z.float().cpu().numpy(), p.float().cpu().numpy()

    def maybe_reload(self, now: float | None = None) -> ReloadOutcome:
        """Between batches: pick up a newer bundle at the same path, keep the old one if it is broken."""
        now = time.monotonic() if now is None else now
        if now - self._last_check < self.reload_check_s:
            return ReloadOutcome(False, True)
        self._last_check = now
        sig = _file_signature(self.bundle_path)
        if sig == self._signature:
            return ReloadOutcome(False, True)
        self._signature = sig
        try:
            bundle = load_bundle(self.bundle_path)
            model = self._build(bundle)
        except BundleError as e:
            self.reload_failures += 1
            self.last_reload_error = str(e)
            log.error("model reload failed, keeping %s:%s: %s", self.name, self.version, e)
            return ReloadOutcome(True, False, str(e))
        old = f"{self.name}:{self.version}"
        self.bundle, self.model = bundle, model
        self.last_reload_error = ""
        log.info("model reloaded: %s -> %s:%s", old, bundle.name, bundle.version)
        return ReloadOutcome(True, True, f"{bundle.name}:{bundle.version}")
