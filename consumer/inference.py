"""Batched inference with the model bundle, on CUDA when there is one, and hot reload of the bundle.

Two kinds of bundle, told apart by the file: a torch bundle (``.pt``, model/bundle.py: CPU or
CUDA, bf16 on CPUs that have it) and a runtime bundle (``.npz``, model/runtime.py: ONNX Runtime on
the CPU, no torch in the process: ~0.5 GB less memory). torch is imported only for the first.

The runner checks the bundle file's (mtime, size, inode) every ``reload_check_s`` between batches;
a changed file is loaded and checked before it replaces the running model, so a broken or
half-written file never stops the stream: the old model keeps running and the failure is logged
and counted.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from alerts.features import FEATURE_NAMES, FEATURES_VERSION
from consumer.batches import ModelMeta
from model.device import cpu_bf16
from model.preprocess import normalise
from model.runtime import RuntimeBundle, RuntimeBundleError, RuntimeModel, int8_self_check, load_runtime

if TYPE_CHECKING:

    from model.bundle import Bundle
    from model.fused import AlertModel


class BundleRefused(ValueError):
    """A bundle this consumer cannot run (broken, or reading other features)."""


def is_runtime_bundle(path: str) -> bool:
    return path.endswith(".npz")

log = logging.getLogger("stampstream.inference")


# Rows per forward pass on the CPU, and the unit batches are padded to (see ModelRunner.predict).
CHUNK = 64


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
        cpu_precision: str = "fp32",
        threads: int | None = None,
        features: tuple[tuple[str, ...], int] = (FEATURE_NAMES, FEATURES_VERSION),
    ) -> None:
        """``threads``: CPU threads of inference, torch's (a process-wide setting; None leaves it
        as it is) or ONNX Runtime's for a runtime bundle (None: 1). ``features``: the names and
        version of the features this code computes for the bundle's survey (ZTF's by default;
        ``alerts.rubin_features`` for a Rubin bundle): a head reading others is refused."""
        self.bundle_path = bundle_path
        self.features = features
        self.cpu_precision = cpu_precision
        self.runtime = is_runtime_bundle(bundle_path)
        self.threads = max(1, threads or 1)
        if self.runtime:  # ONNX Runtime on the CPU; torch is never imported
            if device == "cuda":
                log.warning("model.device is cuda but %s is a runtime bundle (CPU only): use the .pt bundle on a GPU",
                            bundle_path)  # fmt: skip
            self.device: Any = _CpuDevice()
            self.bf16 = False
        else:
            from model.device import select_device

            if threads is not None:
                import torch

                torch.set_num_threads(self.threads)
            self.device = select_device(device)
            # bfloat16 autocast on the CPU (model.cpu_precision): fp32 stays the reference
            self.bf16 = self.device.type == "cpu" and cpu_bf16(cpu_precision)
        self.tta_override = tta_override
        self.reload_check_s = reload_check_s
        self._signature = _file_signature(bundle_path)
        self._install(self._load(bundle_path))
        self._last_check = time.monotonic()
        self.reload_failures = 0
        self.last_reload_error = ""

    def _load(self, path: str) -> Bundle | RuntimeBundle:
        """The bundle at ``path``; BundleRefused if it cannot be read."""
        if self.runtime:
            try:
                return load_runtime(path)
            except RuntimeBundleError as e:
                raise BundleRefused(str(e)) from e
        from model.bundle import BundleError, load_bundle

        try:
            return load_bundle(path)
        except BundleError as e:
            raise BundleRefused(str(e)) from e

    def _install(self, bundle: Bundle | RuntimeBundle, model: AlertModel | RuntimeModel | None = None) -> None:
        self.bundle = bundle
        self.model = self._build(bundle) if model is None else model
        meta = ModelMeta.of(bundle.name, bundle.version, bundle.class_names, bundle.has_head, bundle.features_version)
        self._current = (self.model, meta)

    def _build(self, bundle: Bundle | RuntimeBundle) -> AlertModel | RuntimeModel:
        """The bundle's model, checked against this code's features: a head trained on another
        feature list or version would read its inputs misaligned, so it is refused (BundleRefused)."""
        names, version = bundle.feature_names, bundle.features_version
        expected, expected_version = self.features
        if names and (names != expected or version != expected_version):
            raise BundleRefused(
                f"bundle {bundle.name}:{bundle.version} reads features v{version} "
                f"({len(names)} names); this code computes v{expected_version} ({len(expected)})"
            )
        if isinstance(bundle, RuntimeBundle):
            try:
                return RuntimeModel(bundle, self.threads, int8=self._runtime_int8(bundle))
            except BundleRefused:
                raise
            except Exception as e:  # ONNX Runtime refused the graph
                raise BundleRefused(f"bundle {bundle.name}:{bundle.version}: {e}") from e
        import torch

        # channels_last: oneDNN's (CPU) and cuDNN's fast layout for these small convolutions
        # (1.5x on the CPU benchmark); results are the same up to float rounding.
        model = bundle.build_alert_model(self.device).to(memory_format=torch.channels_last)
        if self.tta_override is not None:
            model.stamp.tta_dihedral = self.tta_override
        return model

    def _runtime_int8(self, bundle: RuntimeBundle) -> bool:
        """Whether a runtime bundle runs its int8 graph (model.cpu_precision): 'int8' requires it
        (a bundle without one, or one this CPU does not reproduce, is refused), 'auto' takes it
        where it passes the self-check and says so when it falls back, 'fp32'/'bf16' never."""
        if self.cpu_precision not in ("auto", "int8"):
            return False
        if not bundle.onnx_int8:
            if self.cpu_precision == "int8":
                raise BundleRefused(f"bundle {bundle.name}:{bundle.version} has no int8 graph (model.cpu_precision int8)")
            return False
        ok, cos = int8_self_check(bundle, self.threads)
        if ok:
            log.info("int8 graph of %s:%s reproduced on this CPU (cosine %.6f): running int8", bundle.name, bundle.version, cos)
            return True
        if self.cpu_precision == "int8":
            raise BundleRefused(f"the int8 graph of {bundle.name}:{bundle.version} does not reproduce on this CPU "
                                f"(cosine {cos:.6f} < 0.9999 on its check inputs)")  # fmt: skip
        log.warning("the int8 graph of %s:%s does not reproduce on this CPU (cosine %.6f): running float32",
                    bundle.name, bundle.version, cos)  # fmt: skip
        return False

    @property
    def precision(self) -> str:
        """What the running model computes in: 'int8' or 'fp32' (runtime), 'bf16' or 'fp32' (torch)."""
        if isinstance(self.model, RuntimeModel):
            return self.model.precision
        return "bf16" if self.bf16 else "fp32"

    @property
    def name(self) -> str:
        return self.bundle.name

    @property
    def version(self) -> str:
        return self.bundle.version

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.bundle.class_names

    def snapshot(self) -> tuple[AlertModel | RuntimeModel, ModelMeta]:
        """The running model and its description, taken together (a reload swaps both at once)."""
        return self._current

    def predict(
        self, raw: np.ndarray, features: np.ndarray, model: AlertModel | RuntimeModel | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(N, 2, 21, 21) raw crops + (N, F) features -> (embeddings (N, latent), stamp-probe
        probabilities (N, classes), probabilities (N, classes)), float32, by ``model`` (a
        ``snapshot``; default: the running model).

        The model only ever sees batches of a multiple of CHUNK rows (the last one padded with
        zeros), and on the CPU exactly CHUNK rows at a time: oneDNN builds and keeps kernels per
        input shape, so batches of every size from 1 to max_batch (a quiet stream closes batches
        by time) grew the consumer's memory by ~4 MiB per new size, past 1 GiB in a replay
        (docs/benchmarks.md). And on the CPU, 64 rows at a time cost ~25 % less per alert than
        512 (the activations stay in cache)."""
        model = self.model if model is None else model
        n = len(raw)
        x = normalise(raw)
        f = np.asarray(features, dtype=np.float32).reshape(n, -1)
        rows = -(-n // CHUNK) * CHUNK
        if rows != n:
            x = np.concatenate([x, np.zeros((rows - n, *x.shape[1:]), dtype=np.float32)])
            f = np.concatenate([f, np.full((rows - n, f.shape[1]), np.nan, dtype=np.float32)])
        if isinstance(model, RuntimeModel):
            parts = [model(x[i : i + CHUNK], f[i : i + CHUNK]) for i in range(0, rows, CHUNK)]
            return tuple(np.concatenate([p[k] for p in parts])[:n] for k in range(3))  # type: ignore[return-value]
        import torch

        t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        ft = torch.from_numpy(f)
        with torch.inference_mode():
            if self.device.type == "cuda":
                dev = self.device
                z, ps, p = model(t.pin_memory().to(dev, non_blocking=True), ft.pin_memory().to(dev, non_blocking=True))
            else:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                    outs = [model(t[i : i + CHUNK], ft[i : i + CHUNK]) for i in range(0, rows, CHUNK)]
                z, ps, p = (torch.cat([o[k] for o in outs]) for k in (0, 1, 2))
        return z[:n].float().cpu().numpy(), ps[:n].float().cpu().numpy(), p[:n].float().cpu().numpy()

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
            bundle = self._load(self.bundle_path)
            model = self._build(bundle)
        except BundleRefused as e:
            self.reload_failures += 1
            self.last_reload_error = str(e)
            log.error("model reload failed, keeping %s:%s: %s", self.name, self.version, e)
            return ReloadOutcome(True, False, str(e))
        old = f"{self.name}:{self.version}"
        self._install(bundle, model)
        self.last_reload_error = ""
        log.info("model reloaded: %s -> %s:%s", old, bundle.name, bundle.version)
        return ReloadOutcome(True, True, f"{bundle.name}:{bundle.version}")


class _CpuDevice:
    """What ``runner.device`` says for a runtime bundle (no torch.device without torch)."""

    type = "cpu"

    def __str__(self) -> str:
        return "cpu (onnxruntime)"
