"""A torch bundle -> the torch-free runtime bundle (``model/runtime.py``): the encoder + stamp
probe exported to ONNX, the fused head's tables and weights copied as arrays.

    python -m model.runtime_export model/bundles/default.pt model/bundles/default.npz

Needs torch and the ``onnx`` package (the trainer's side); the result needs neither. The export is
checked before it is written: the runtime's outputs on a batch of random stamps and features must
equal the torch model's (class identical, cosine of z >= 0.9999), else RuntimeBundleError.
"""

from __future__ import annotations

import argparse
import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.bundle import Bundle, load_bundle
from model.preprocess import NORMALISATION
from model.runtime import RuntimeBundle, RuntimeBundleError, RuntimeModel, cosines, save_runtime


def onnx_graph(module: torch.nn.Module, outputs: tuple[str, ...]) -> bytes:
    """A module of (N, 2, 21, 21) stamps as an ONNX graph with a dynamic batch axis (input "x")."""
    buf = io.BytesIO()
    axes = {"x": {0: "n"}} | {o: {0: "n"} for o in outputs}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy exporter announces its deprecation
        target: Any = buf  # a file object is accepted too (the stubs say paths only)
        torch.onnx.export(module.eval(), (torch.zeros(64, 2, 21, 21),), target, input_names=["x"],
                          output_names=list(outputs), dynamic_axes=axes, opset_version=17, dynamo=False)  # fmt: skip
    return buf.getvalue()


def stamp_onnx(bundle: Bundle) -> bytes:
    """The encoder + stamp probe as an ONNX graph (outputs "z" and "p")."""
    return onnx_graph(bundle.build("cpu"), ("z", "p"))


def to_runtime(bundle: Bundle, source: str = "") -> RuntimeBundle:
    latent = bundle.model_config.latent_dim
    n_classes = len(bundle.class_names)
    trees: dict[str, np.ndarray] = {}
    weight, bias = np.zeros((n_classes, latent), np.float32), np.zeros(n_classes, np.float32)
    z_mean, z_std, temperature = np.zeros(latent, np.float32), np.ones(latent, np.float32), 1.0
    if bundle.head is not None:
        head = bundle.head.build(latent)
        trees = head.trees.tables()
        weight = head.fusion.weight.detach().numpy().astype(np.float32)
        bias = head.fusion.bias.detach().numpy().astype(np.float32)
        z_mean, z_std = head.z_mean.numpy().astype(np.float32), head.z_std.numpy().astype(np.float32)
        temperature = float(head.temperature)
    return RuntimeBundle(
        bundle.name, bundle.version, tuple(bundle.class_names), latent, tuple(bundle.feature_names),
        bundle.head.features_version if bundle.head is not None else 0, stamp_onnx(bundle), trees, weight, bias,
        z_mean, z_std, temperature, dict(NORMALISATION), source,
    )  # fmt: skip


def check_equal(bundle: Bundle, runtime: RuntimeBundle, n: int = 256, seed: int = 0) -> None:
    """The runtime against torch on random inputs (features with NaNs); RuntimeBundleError if not equal."""
    rng = np.random.default_rng(seed)
    x = rng.random((n, 2, 21, 21), dtype=np.float32)
    f = rng.normal(size=(n, max(1, len(runtime.feature_names)))).astype(np.float32)
    f[rng.random(f.shape) < 0.2] = np.nan
    with torch.inference_mode():
        z_t, ps_t, p_t = (t.numpy() for t in bundle.build_alert_model("cpu")(torch.from_numpy(x), torch.from_numpy(f)))
    z_r, ps_r, p_r = RuntimeModel(runtime)(x, f)
    cos = cosines(z_t, z_r)
    if cos.min() < 0.9999 or not np.allclose(p_t, p_r, atol=1e-4) or not np.allclose(ps_t, ps_r, atol=1e-4):
        raise RuntimeBundleError(f"runtime differs from torch: min cosine {cos.min():.6f}, "
                                 f"max |dp| {np.abs(p_t - p_r).max():.2e}")  # fmt: skip


class EncoderMean(torch.nn.Module):
    """The encoder's mean z (a VAE's too), the one output of an encoder-only graph."""

    def __init__(self, encoder: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mu, _ = self.encoder(x)
        return mu  # type: ignore[no-any-return]


def encoder_runtime(encoder: torch.nn.Module, name: str, version: str, latent_dim: int, source: str = "") -> RuntimeBundle:
    """An encoder without a classifier (a survey without labels: Rubin today) -> a runtime bundle
    with no classes, whose graph outputs z alone; checked equal to torch before it is returned."""
    module = EncoderMean(encoder).eval()
    empty = np.zeros((0, latent_dim), np.float32)
    runtime = RuntimeBundle(
        name, version, (), latent_dim, (), 0, onnx_graph(module, ("z",)), {}, empty, np.zeros(0, np.float32),
        np.zeros(latent_dim, np.float32), np.ones(latent_dim, np.float32), 1.0, dict(NORMALISATION), source,
    )  # fmt: skip
    x = np.random.default_rng(0).random((128, 2, 21, 21), dtype=np.float32)
    with torch.inference_mode():
        z_t = module(torch.from_numpy(x)).numpy()
    z_r, _, p_r = RuntimeModel(runtime)(x, np.zeros((128, 0), np.float32))
    cos = cosines(z_t, z_r)
    if cos.min() < 0.9999 or p_r.shape != (128, 0):
        raise RuntimeBundleError(f"encoder runtime differs from torch: min cosine {cos.min():.6f}")
    return runtime


def export_runtime(bundle_path: str | Path, out: str | Path) -> RuntimeBundle:
    bundle = load_bundle(bundle_path)
    runtime = to_runtime(bundle, source=Path(bundle_path).name)
    check_equal(bundle, runtime)
    save_runtime(runtime, out)
    return runtime


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bundle")
    ap.add_argument("out")
    a = ap.parse_args()
    rb = export_runtime(a.bundle, a.out)
    print(f"{a.out}: {rb.name}:{rb.version}, {'fused head' if rb.has_head else 'stamp probe'}, "
          f"{Path(a.out).stat().st_size / 1e6:.1f} MB")  # fmt: skip


if __name__ == "__main__":
    main()
