"""The model without torch: a runtime bundle (one ``.npz``) and its evaluation with ONNX Runtime.

Why: importing torch alone costs a process ~530 MiB of RSS (measured), more than all the rest of
the consumer, and torch is ~2 GB of an image. The consumer needs only the forward pass: the
encoder + stamp probe as an ONNX graph (run by ONNX Runtime's CPU provider: 172 µs/alert on one
thread against torch's 191 in fp32, docs/benchmarks.md), the trees by the same compiled loop as
the torch module (``model/tree_kernel.py``), and the fusion + temperature in numpy. The outputs
equal the torch bundle's to float rounding (test: class identical, cosine of z >= 0.9999).

Where the bundle carries one, the encoder also comes as an **int8 graph** (``onnx_int8``; made by
``trainer/quantize.py``: 63 µs/alert against 172, embedding cosine >= 0.999 and the published class
identical to fp32 torch on the real alerts, docs/benchmarks.md). Integer kernels are only as exact
as the CPU's instructions (x86 without VNNI can saturate in u8 x s8 products), so the bundle also
carries the int8 graph's own z on fixed inputs, computed where it was made, and the consumer runs
int8 only where this machine reproduces them (``int8_self_check``); else the float32 graph.

The file holds arrays only (``np.load(..., allow_pickle=False)``): the ONNX graph as bytes, the
tree tables, the fusion weights, and a JSON description (name, version, classes, features, their
version, the input normalisation). Made from a torch bundle by ``model/runtime_export.py``
(``trainer export`` writes both).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from model.tree_kernel import evaluate_trees

RUNTIME_FORMAT = "stampstream-runtime/1"
TREE_TABLES = ("feature", "threshold", "left", "right", "missing_left", "is_leaf", "value", "tree_class", "baseline")


class RuntimeBundleError(ValueError):
    """Not a runtime bundle this code can run."""


@dataclass(frozen=True)
class RuntimeBundle:
    name: str
    version: str
    class_names: tuple[str, ...]
    latent_dim: int
    feature_names: tuple[str, ...]  # empty: no fused head (the classes are the stamp probe's)
    features_version: int
    onnx: bytes  # (N, 2, 21, 21) normalised stamps -> z (N, latent), stamp probabilities (N, classes);
    # z alone where class_names is empty (an encoder without a classifier: model/runtime_export.py)
    trees: dict[str, np.ndarray]  # model.tree_kernel tables; empty without a head
    fusion_weight: np.ndarray  # (classes, latent)
    fusion_bias: np.ndarray  # (classes,)
    z_mean: np.ndarray
    z_std: np.ndarray
    temperature: float
    normalisation: dict[str, Any]
    source: str = ""  # the torch bundle it was made from
    onnx_int8: bytes = b""  # the same outputs from an int8 graph (trainer/quantize.py); empty: none
    int8_check_z: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))  # z on check_inputs()
    int8_fidelity: dict[str, Any] = field(default_factory=dict)  # against fp32 torch, measured at export

    @property
    def has_head(self) -> bool:
        return bool(self.feature_names)


def save_runtime(b: RuntimeBundle, path: str | os.PathLike[str]) -> None:
    """Written to a temporary name and renamed, so a reloading consumer never reads half a file."""
    meta = {
        "format": RUNTIME_FORMAT, "name": b.name, "version": b.version, "class_names": list(b.class_names),
        "latent_dim": b.latent_dim, "feature_names": list(b.feature_names), "features_version": b.features_version,
        "temperature": b.temperature, "normalisation": b.normalisation, "source": b.source,
        "int8_fidelity": b.int8_fidelity,
    }  # fmt: skip
    arrays: dict[str, np.ndarray] = {f"trees_{k}": v for k, v in b.trees.items()}
    arrays |= {"meta": np.array(json.dumps(meta)), "onnx": np.frombuffer(b.onnx, dtype=np.uint8),
               "fusion_weight": b.fusion_weight, "fusion_bias": b.fusion_bias, "z_mean": b.z_mean, "z_std": b.z_std}  # fmt: skip
    if b.onnx_int8:
        arrays |= {"onnx_int8": np.frombuffer(b.onnx_int8, dtype=np.uint8), "int8_check_z": b.int8_check_z}
    path = Path(path)
    tmp = path.with_name(path.name + ".part.npz")
    # compressed: the tree tables are padded to the widest tree and shrink ~4x (20261128b: 2.2 MB
    # -> 0.95 MB); np.load reads either form, and a bundle is read once per (re)load
    np.savez_compressed(tmp, **arrays)  # type: ignore[arg-type]
    os.replace(tmp, path)


def load_runtime(path: str | os.PathLike[str]) -> RuntimeBundle:
    try:
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("format") != RUNTIME_FORMAT:
                raise RuntimeBundleError(f"{path}: format {meta.get('format')!r}, expected {RUNTIME_FORMAT}")
            trees = {k[len("trees_"):]: z[k] for k in z.files if k.startswith("trees_")}
            b = RuntimeBundle(
                meta["name"], meta["version"], tuple(meta["class_names"]), int(meta["latent_dim"]),
                tuple(meta["feature_names"]), int(meta["features_version"]), z["onnx"].tobytes(), trees,
                z["fusion_weight"], z["fusion_bias"], z["z_mean"], z["z_std"], float(meta["temperature"]),
                dict(meta["normalisation"]), str(meta.get("source", "")),
                z["onnx_int8"].tobytes() if "onnx_int8" in z.files else b"",
                z["int8_check_z"] if "int8_check_z" in z.files else np.zeros((0, 0), np.float32),
                dict(meta.get("int8_fidelity", {})),
            )  # fmt: skip
    except RuntimeBundleError:
        raise
    except Exception as e:  # truncated, not an npz, missing keys
        raise RuntimeBundleError(f"{path}: not a runtime bundle: {type(e).__name__}: {e}") from e
    if b.has_head and set(b.trees) != set(TREE_TABLES):
        raise RuntimeBundleError(f"{path}: tree tables {sorted(b.trees)}")
    return b


INT8_CHECK_ROWS = 64


def check_inputs() -> np.ndarray:
    """Fixed stamps (no data): smooth blobs over noise, the same on every machine (numpy's PCG64)."""
    rng = np.random.default_rng(20261126)
    yy, xx = np.mgrid[0:21, 0:21]
    x = rng.random((INT8_CHECK_ROWS, 2, 21, 21), dtype=np.float32) * 0.3
    for i in range(INT8_CHECK_ROWS):
        cy, cx, w = rng.uniform(6, 14), rng.uniform(6, 14), rng.uniform(1.0, 4.0)
        blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * w * w)).astype(np.float32)
        x[i] += blob * rng.uniform(0.3, 1.0, size=(2, 1, 1)).astype(np.float32)
    return np.asarray(x / x.max(axis=(2, 3), keepdims=True), dtype=np.float32)


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Row-wise cosine of two (N, D) arrays (1.0 where a row is all zero)."""
    num = (a * b).sum(1)
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.asarray(np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0), dtype=np.float64)


def int8_self_check(bundle: RuntimeBundle, threads: int = 1) -> tuple[bool, float]:
    """(passes, min cosine): this machine's int8 z on ``check_inputs()`` against the z stored at
    export. Integer kernels differ between CPUs only by a float rounding when they are exact; a
    saturating kernel moves z by far more than 1e-4."""
    if not bundle.onnx_int8 or bundle.int8_check_z.shape != (INT8_CHECK_ROWS, bundle.latent_dim):
        return False, 0.0
    z = RuntimeModel(bundle, threads, int8=True).embed(check_inputs())
    cos = float(cosines(z, bundle.int8_check_z).min())
    return cos >= 0.9999, cos


def _softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float32)


class RuntimeModel:
    """(N, 2, 21, 21) normalised stamps + (N, F) features -> (z, stamp probabilities,
    probabilities), float32 numpy, as ``model.fused.AlertModel`` computes them."""

    def __init__(self, bundle: RuntimeBundle, threads: int = 1, int8: bool = False) -> None:
        """``int8``: run the bundle's int8 graph (RuntimeBundleError if it has none)."""
        import onnxruntime as ort

        if int8 and not bundle.onnx_int8:
            raise RuntimeBundleError(f"{bundle.name}:{bundle.version} has no int8 graph")
        self.bundle = bundle
        self.precision = "int8" if int8 else "fp32"
        so = ort.SessionOptions()
        so.intra_op_num_threads = max(1, threads)
        so.inter_op_num_threads = 1
        graph = bundle.onnx_int8 if int8 else bundle.onnx
        self.session = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])

    def embed(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})[0], dtype=np.float32)

    def __call__(self, x: np.ndarray, features: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        outs = self.session.run(None, {"x": np.ascontiguousarray(x, dtype=np.float32)})
        z = np.asarray(outs[0], dtype=np.float32)
        b = self.bundle
        if not b.class_names:  # an encoder without a classifier (a survey without labels): z alone
            none = np.zeros((len(z), 0), dtype=np.float32)
            return z, none, none
        stamp = np.asarray(outs[1], dtype=np.float32)
        if not b.has_head:
            return z, stamp, stamp
        logits = evaluate_trees(features, b.trees) + ((z - b.z_mean) / b.z_std) @ b.fusion_weight.T + b.fusion_bias
        return z, stamp, _softmax(logits / b.temperature)
