"""Shapes of the autoencoder, VAE and probe; bundle round trip, checks and hot reload."""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from alerts.features import FEATURE_NAMES, FEATURES_VERSION
from consumer.inference import CHUNK, BundleRefused, ModelRunner
from model.autoencoder import Autoencoder, AutoencoderConfig, autoencoder_loss, dihedral_views
from model.bundle import BundleError, load_bundle, save_bundle, seed_bundle
from model.classifier import StampClassifier
from model.device import select_device
from model.preprocess import normalise


@pytest.mark.parametrize("kind", ["ae", "vae"])
@pytest.mark.parametrize("latent", [10, 42, 130])
def test_autoencoder_shapes(kind: str, latent: int) -> None:
    m = Autoencoder(AutoencoderConfig(kind=kind, latent_dim=latent))
    x = torch.rand(5, 2, 21, 21)
    recon, mu, logvar = m(x)
    assert recon.shape == x.shape and mu.shape == (5, latent)
    assert (logvar is None) == (kind == "ae")
    loss, mse = autoencoder_loss(x, recon, mu, logvar, 1e-3)
    assert loss.item() >= mse.item() - 1e-9 if kind == "vae" else loss.item() == mse.item()
    convs = [mod for mod in m.encoder.modules() if isinstance(mod, torch.nn.Conv2d)]
    assert len(convs) == 4
    assert len([mod for mod in m.decoder.modules() if isinstance(mod, torch.nn.Conv2d)]) == 6


def test_dihedral_views_are_the_eight_symmetries() -> None:
    x = torch.arange(2 * 21 * 21, dtype=torch.float32).view(1, 2, 21, 21)
    views = dihedral_views(x)
    assert len(views) == 8
    assert len({tuple(v.flatten().tolist()) for v in views}) == 8


def test_tta_embedding_is_rotation_invariant() -> None:
    torch.manual_seed(0)
    m = StampClassifier(AutoencoderConfig(latent_dim=16), ("a", "b"), tta_dihedral=True).eval()
    x = torch.rand(3, 2, 21, 21)
    with torch.no_grad():
        z1, _ = m(x)
        z2, _ = m(torch.rot90(x, 1, dims=(2, 3)))
    torch.testing.assert_close(z1, z2, rtol=1e-4, atol=1e-5)


def test_normalise_range_and_nan() -> None:
    raw = np.random.default_rng(0).normal(100, 10, (4, 2, 21, 21)).astype(np.float32)
    raw[0, 0, :3] = np.nan
    raw[1, 1] = 5.0  # constant channel
    x = normalise(raw)
    assert x.dtype == np.float32 and np.isfinite(x).all()
    assert x.min() == 0.0 and x.max() == 1.0
    assert np.all(x[0, 0, :3] == 0) and np.all(x[1, 1] == 0)


def test_bundle_round_trip(tmp_path: Path) -> None:
    b = seed_bundle(latent_dim=21, seed=3)
    save_bundle(b, tmp_path / "b.pt")
    back = load_bundle(tmp_path / "b.pt")
    assert back.model_config == b.model_config and back.class_names == b.class_names
    assert back.normalisation["method"] == "minmax_per_channel" and back.code_version
    x = torch.rand(4, 2, 21, 21)
    with torch.no_grad():
        z1, p1 = b.build()(x)
        z2, p2 = back.build()(x)
    torch.testing.assert_close(z1, z2)
    torch.testing.assert_close(p1, p2)
    assert torch.allclose(p1.sum(1), torch.ones(4))


@pytest.mark.parametrize("content", [b"", b"garbage", b"PK\x03\x04 not a torch file"])
def test_broken_bundles_are_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "bad.pt").write_bytes(content)
    with pytest.raises(BundleError):
        load_bundle(tmp_path / "bad.pt")


def test_bundle_with_mismatched_weights_is_refused(tmp_path: Path) -> None:
    b = seed_bundle(latent_dim=21)
    torch.save({"format": "stampstream-bundle/1", "name": "x", "version": "1", "model_config": {"kind": "ae", "latent_dim": 42},
                "class_names": list(b.class_names), "tta_dihedral": False, "normalisation": b.normalisation,
                "encoder_state": b.encoder_state, "probe_state": b.probe_state}, tmp_path / "m.pt")  # fmt: skip
    with pytest.raises(BundleError, match="weights do not fit"):
        load_bundle(tmp_path / "m.pt")


def test_hot_reload_picks_up_new_bundle_and_keeps_old_on_broken(tmp_path: Path) -> None:
    path = tmp_path / "live.pt"
    save_bundle(seed_bundle(seed=1), path)
    runner = ModelRunner(str(path), "cpu", reload_check_s=0.0)
    raw = np.random.default_rng(0).normal(size=(3, 2, 21, 21)).astype(np.float32)
    nof = np.zeros((3, 0), np.float32)
    z_old, _, _ = runner.predict(raw, nof)
    assert not runner.maybe_reload().changed

    newer = seed_bundle(seed=2)
    newer = type(newer)(**{**newer.__dict__, "version": "2"})
    save_bundle(newer, path)
    os.utime(path, (time.time() + 5, time.time() + 5))
    out = runner.maybe_reload()
    assert out.changed and out.ok and runner.version == "2"
    z_new, _, _ = runner.predict(raw, nof)
    assert not np.allclose(z_old, z_new)

    path.write_bytes(b"half-written garbage")
    out = runner.maybe_reload()
    assert out.changed and not out.ok and "not readable" in out.message
    assert runner.version == "2" and runner.reload_failures == 1
    np.testing.assert_array_equal(runner.predict(raw, nof)[0], z_new)


@pytest.mark.parametrize("n", [1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 5])
def test_predict_runs_fixed_shape_chunks_and_returns_exactly_the_rows_given(tmp_path: Path, n: int) -> None:
    """The model only ever sees CHUNK rows on the CPU (one shape: flat memory), the padding rows
    never reach the caller, and each row's result is the one it gets alone."""
    path = tmp_path / "b.pt"
    save_bundle(seed_bundle(seed=5), path)
    runner = ModelRunner(str(path), "cpu")
    eager = runner.model
    shapes: list[tuple[int, ...]] = []

    def recording(x: torch.Tensor, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        shapes.append(tuple(x.shape))
        return eager(x, f)

    runner.model = recording  # type: ignore[assignment]
    raw = np.random.default_rng(n).normal(size=(n, 2, 21, 21)).astype(np.float32)
    z, _, p = runner.predict(raw, np.zeros((n, 0), np.float32))
    assert z.shape == (n, eager.stamp.cfg.latent_dim) and p.shape == (n, 5)
    assert set(shapes) == {(CHUNK, 2, 21, 21)} and len(shapes) == -(-n // CHUNK)
    with torch.inference_mode():
        z_ref, _, p_ref = eager(torch.from_numpy(normalise(raw)), torch.zeros(n, 0))
    np.testing.assert_allclose(z, z_ref.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p, p_ref.numpy(), rtol=1e-4, atol=1e-5)


def test_device_selection_falls_back_to_cpu() -> None:
    if torch.cuda.is_available():
        assert select_device("auto").type == "cuda"
    else:
        assert select_device("auto").type == "cpu"
        assert select_device("cuda").type == "cpu"
    assert select_device("cpu").type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")
def test_cuda_runner_matches_cpu(tmp_path: Path) -> None:
    path = tmp_path / "b.pt"
    save_bundle(seed_bundle(), path)
    raw = np.random.default_rng(0).normal(size=(64, 2, 21, 21)).astype(np.float32)
    path2 = tmp_path / "fused.pt"
    save_bundle(seed_bundle(feature_names=FEATURE_NAMES, features_version=FEATURES_VERSION), path2)
    feats = np.random.default_rng(1).normal(size=(64, len(FEATURE_NAMES))).astype(np.float32)
    z_cpu, _, p_cpu = ModelRunner(str(path2), "cpu").predict(raw, feats)
    z_gpu, _, p_gpu = ModelRunner(str(path2), "cuda").predict(raw, feats)
    np.testing.assert_allclose(z_cpu, z_gpu, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(p_cpu, p_gpu, rtol=1e-3, atol=1e-3)


def test_fused_bundle_round_trips_and_its_head_changes_the_classes(tmp_path: Path) -> None:
    path = tmp_path / "fused.pt"
    save_bundle(seed_bundle(seed=3, feature_names=FEATURE_NAMES, features_version=FEATURES_VERSION), path)
    b = load_bundle(path)
    assert b.head is not None and b.feature_names == FEATURE_NAMES
    runner = ModelRunner(str(path), "cpu")
    raw = np.random.default_rng(0).normal(size=(7, 2, 21, 21)).astype(np.float32)
    feats = np.random.default_rng(1).normal(size=(7, len(FEATURE_NAMES))).astype(np.float32)
    feats[0] = np.nan  # missing features are an input like any other
    z, stamp, fused = runner.predict(raw, feats)
    assert z.shape == (7, 42) and stamp.shape == fused.shape == (7, 5)
    np.testing.assert_allclose(fused.sum(1), 1.0, rtol=1e-5)
    assert not np.allclose(stamp, fused)
    assert runner.snapshot()[1].classifier == "fused"


def test_a_head_reading_other_features_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "other.pt"
    save_bundle(seed_bundle(feature_names=("a", "b"), features_version=FEATURES_VERSION), path)
    with pytest.raises(BundleRefused, match="features"):
        ModelRunner(str(path), "cpu")


def test_cpu_precision_choice() -> None:
    from model.device import cpu_bf16, cpu_flags

    flags = cpu_flags("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\nbugs\t\t: spectre\n")
    assert {"avx512_bf16", "avx512f"} <= flags
    assert cpu_bf16("auto", flags) and not cpu_bf16("auto", {"avx2", "avx512f"})
    assert cpu_bf16("bf16", set()) and not cpu_bf16("fp32", flags)


def test_bf16_inference_keeps_the_classes_and_the_embedding() -> None:
    """The shipped bundle under bf16 autocast against fp32, on generated alerts decoded by the
    consumer's own code: the performance issue's fidelity bounds (class equal on >= 99.5 %, cosine
    of z >= 0.999). The benchmark measures the same on every real alert (docs/benchmarks.md)."""
    from alerts.decoder import SchemaCache
    from alerts.features import alert_features
    from alerts.message import decode_message
    from alerts.synthetic import make_alerts

    cache = SchemaCache()
    decoded = [decode_message(a.message, cache) for a in make_alerts(128)]
    raw = np.stack([px.pixels for _, px in decoded])
    feats = np.stack([alert_features(al) for al, _ in decoded]).astype(np.float32)
    bundle = str(Path(__file__).resolve().parents[2] / "model" / "bundles" / "default.pt")
    ref, low = ModelRunner(bundle, "cpu", cpu_precision="fp32"), ModelRunner(bundle, "cpu", cpu_precision="bf16")
    assert low.bf16 and not ref.bf16
    z32, _, p32 = ref.predict(raw, feats)
    z16, _, p16 = low.predict(raw, feats)
    cos = (z32 * z16).sum(1) / np.linalg.norm(z32, axis=1) / np.linalg.norm(z16, axis=1)
    assert cos.min() >= 0.999
    assert (p32.argmax(1) == p16.argmax(1)).mean() >= 0.98  # 128 alerts: at most 2 flips
    assert not np.array_equal(z32, z16), "bf16 really ran"
