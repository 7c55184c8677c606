"""The int8 graph of the runtime bundle (trainer/quantize.py): equalisation keeps the function, the
hand-written int8 simulation it is distilled through is ONNX Runtime's int8 arithmetic, and only a
graph meeting the fidelity targets enters a bundle, with the z the consumer's self-check needs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT

import trainer.quantize as q
from alerts.features import FEATURE_NAMES, FEATURES_VERSION
from consumer.inference import ModelRunner
from model.bundle import seed_bundle
from model.runtime import INT8_CHECK_ROWS, check_inputs, cosines, load_runtime, save_runtime
from model.runtime_export import to_runtime


def stamps(n: int, seed: int) -> np.ndarray:
    """Normalised stamps with structure (a blob per channel over noise), like check_inputs()."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:21, 0:21]
    x = rng.random((n, 2, 21, 21), dtype=np.float32) * rng.uniform(0.05, 0.5, (n, 1, 1, 1)).astype(np.float32)
    c = rng.uniform(5, 15, (n, 2, 2))
    w = rng.uniform(0.8, 5.0, (n, 2))
    for i in range(n):
        for ch in range(2):
            x[i, ch] += np.exp(-((yy - c[i, ch, 0]) ** 2 + (xx - c[i, ch, 1]) ** 2) / (2 * w[i, ch] ** 2))
    lo, hi = x.min(axis=(2, 3), keepdims=True), x.max(axis=(2, 3), keepdims=True)
    return np.asarray((x - lo) / (hi - lo), dtype=np.float32)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equalisation_keeps_the_encoders_function(seed: int) -> None:
    enc = seed_bundle(seed=seed).build("cpu").encoder.eval()
    x = torch.from_numpy(stamps(128, seed))
    eq = q.equalise(enc, x, alpha=(1.0, 1.0, 1.0, 1.0), max_gain=1e9)
    with torch.no_grad():
        z, z_eq = enc(x)[0], eq(x)[0]
    torch.testing.assert_close(z_eq, z, rtol=1e-4, atol=1e-5)
    # alpha 1: every live channel of the last map now reaches the same maximum
    r = q._channel_max(eq, x, 3)
    live = r[r > 0]
    assert float(live.min()) == pytest.approx(float(live.max()), rel=1e-4)
    assert not torch.equal(eq.fc.weight, enc.fc.weight)  # it did something


@pytest.mark.parametrize("seed", [0, 3])
def test_the_int8_simulation_is_onnx_runtimes_int8(seed: int) -> None:
    """What the student is trained through must be what ONNX Runtime computes: the simulated z and
    the quantised graph's z agree far better than either agrees with float32, on every x86 CPU
    (weights within +-64: no kernel saturates; with full-range weights this failed on AVX2)."""
    model = seed_bundle(seed=seed).build("cpu").eval()
    x = stamps(512, seed + 10)
    graph = q.quantise_onnx(q.onnx_graph(model, ("z", "p")), x)
    import onnxruntime as ort

    z_ort = ort.InferenceSession(graph, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    xt = torch.from_numpy(x)
    with torch.no_grad():
        z_sim = q.SimulatedInt8Encoder(model.encoder, q.activation_ranges(model.encoder, xt))(xt).numpy()
        z_32 = model.encoder(xt)[0].numpy()
    err_sim = np.abs(z_sim - z_ort).mean()
    err_32 = np.abs(z_32 - z_ort).mean()
    assert err_sim < 0.2 * err_32, (err_sim, err_32)
    assert cosines(z_sim, z_ort).min() > 0.9999


@pytest.mark.parametrize("name", ["default.npz", "rubin.npz"])
def test_the_shipped_int8_graphs_cannot_saturate_a_pairwise_int16_sum(name: str) -> None:
    """On x86 without AVX-512 VNNI, ONNX Runtime adds u8 x s8 products in pairs into int16: weights
    within +-WEIGHT_QMAX keep 2 x 255 x |w| below 32,767, so every x86 CPU computes the same
    integers and the consumer's self-check passes wherever the bundle goes."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load_from_string(load_runtime(ROOT / "model" / "bundles" / name).onnx_int8).graph
    weights = [numpy_helper.to_array(t).astype(np.int32) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert len(weights) >= 3 and max(int(np.abs(w).max()) for w in weights) <= q.WEIGHT_QMAX
    assert 2 * 255 * q.WEIGHT_QMAX <= 2**15 - 1


def test_only_a_faithful_int8_graph_enters_the_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bundle = seed_bundle(seed=4, feature_names=FEATURE_NAMES, features_version=FEATURES_VERSION)
    runtime = to_runtime(bundle)
    x = stamps(256, 4)
    f = np.random.default_rng(4).normal(size=(256, len(FEATURE_NAMES))).astype(np.float32)
    cfg = q.DistilConfig(epochs=1, augment=False)
    monkeypatch.setattr(q, "MIN_COSINE_MEAN", 1.01)  # unreachable: the bundle stays float32
    assert q.with_int8(bundle, runtime, x, f, cfg, log=lambda _: None) is runtime
    monkeypatch.setattr(q, "MIN_COSINE_MEAN", 0.99)
    monkeypatch.setattr(q, "MIN_CLASS_EQUAL", 0.9)
    out = q.with_int8(bundle, runtime, x, f, cfg, log=lambda _: None)
    assert out.onnx_int8 and out.int8_check_z.shape == (INT8_CHECK_ROWS, 42)
    assert out.int8_fidelity["alerts"] == 256 and out.int8_fidelity["cosine_mean"] >= 0.99
    save_runtime(out, tmp_path / "b.npz")
    back = load_runtime(tmp_path / "b.npz")
    assert back.onnx_int8 == out.onnx_int8 and back.int8_fidelity == out.int8_fidelity
    np.testing.assert_array_equal(back.int8_check_z, out.int8_check_z)
    runner = ModelRunner(str(tmp_path / "b.npz"), "cpu", cpu_precision="int8")
    assert runner.precision == "int8"
    z, _, p = runner.predict(check_inputs() * 100.0, np.full((INT8_CHECK_ROWS, len(FEATURE_NAMES)), np.nan, np.float32))
    assert z.shape == (INT8_CHECK_ROWS, 42) and p.shape == (INT8_CHECK_ROWS, 5)
