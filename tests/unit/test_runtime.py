"""The torch-free runtime bundle: equal to the torch bundle it was made from, refused when broken,
and a consumer running it never imports torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from alerts.features import FEATURE_NAMES, FEATURES_VERSION
from consumer.inference import BundleRefused, ModelRunner
from model.bundle import save_bundle, seed_bundle
from model.runtime import RuntimeBundleError, load_runtime
from model.runtime_export import export_runtime

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_PT = ROOT / "model" / "bundles" / "default.pt"
DEFAULT_NPZ = ROOT / "model" / "bundles" / "default.npz"


def real_inputs(n: int = 128) -> tuple[np.ndarray, np.ndarray]:
    from alerts.decoder import SchemaCache
    from alerts.features import alert_features
    from alerts.message import decode_message
    from alerts.synthetic import make_alerts

    cache = SchemaCache()
    decoded = [decode_message(a.message, cache) for a in make_alerts(n)]
    return np.stack([px.pixels for _, px in decoded]), np.stack([alert_features(al) for al, _ in decoded])


def test_the_shipped_runtime_bundle_is_the_shipped_torch_bundle() -> None:
    rt = load_runtime(DEFAULT_NPZ)
    torch_runner = ModelRunner(str(DEFAULT_PT), "cpu", cpu_precision="fp32")
    assert (rt.name, rt.version, rt.class_names) == (torch_runner.name, torch_runner.version, torch_runner.class_names)
    assert rt.feature_names == FEATURE_NAMES and rt.features_version == FEATURES_VERSION
    raw, feats = real_inputs()
    z_t, ps_t, p_t = torch_runner.predict(raw, feats)
    runner = ModelRunner(str(DEFAULT_NPZ), "auto")
    assert runner.runtime and str(runner.device) == "cpu (onnxruntime)"
    z_r, ps_r, p_r = runner.predict(raw, feats)
    cos = (z_t * z_r).sum(1) / np.linalg.norm(z_t, axis=1) / np.linalg.norm(z_r, axis=1)
    assert cos.min() >= 0.9999
    assert (p_t.argmax(1) == p_r.argmax(1)).all() and np.allclose(p_t, p_r, atol=1e-4)
    assert np.allclose(ps_t, ps_r, atol=1e-4)
    assert runner.snapshot()[1].classifier == "fused"


def test_the_shipped_head_gates_a_known_object_on_its_shape_measure() -> None:
    """Every tree of the shipped ensemble starts with the head's gate (trainer/classify.py
    ``history_gate``): the alert's own detections, then, for an alert without any history, its
    ``ndethist`` and its ``elong``, so that a known object's packet rebuilt without its shape
    measures reaches the early trees, which learnt where nulls go (docs/model-experiments.md, "Known objects
    rebuilt without a history")."""
    from config.trainer import HeadConfig
    from trainer.classify import history_gate

    rt = load_runtime(DEFAULT_NPZ)
    gate = history_gate(HeadConfig())
    feature = rt.trees["feature"].reshape(len(rt.trees["tree_class"]), -1)
    assert gate.present_column is not None and rt.feature_names[gate.present_column] == "elong"
    assert (feature[:, :4] == [gate.column, gate.empty_column, gate.count_column, gate.present_column]).all()


def test_the_shipped_rubin_bundles_are_one_encoder_without_classes() -> None:
    from alerts.message import decode_rubin_message
    from alerts.rubin import RubinSchemaCache
    from alerts.rubin_features import RUBIN_FEATURE_NAMES, RUBIN_FEATURES_VERSION, rubin_features
    from alerts.synthetic_rubin import make_rubin_message

    cache = RubinSchemaCache()
    decoded = [decode_rubin_message(make_rubin_message(1100, 1 + i, seed=i), cache) for i in range(70)]
    raw = np.stack([px.pixels for _, px in decoded])
    feats = np.stack([rubin_features(a) for a, _ in decoded])
    features = (RUBIN_FEATURE_NAMES, RUBIN_FEATURES_VERSION)
    pt = ModelRunner(str(ROOT / "model" / "bundles" / "rubin.pt"), "cpu", cpu_precision="fp32", features=features)
    npz = ModelRunner(str(ROOT / "model" / "bundles" / "rubin.npz"), "auto", features=features)
    (z_t, ps_t, p_t), (z_r, ps_r, p_r) = pt.predict(raw, feats), npz.predict(raw, feats)
    cos = (z_t * z_r).sum(1) / np.linalg.norm(z_t, axis=1) / np.linalg.norm(z_r, axis=1)
    assert z_t.shape == (70, 42) and cos.min() >= 0.9999
    assert ps_t.shape == p_t.shape == ps_r.shape == p_r.shape == (70, 0)
    for runner in (pt, npz):
        assert runner.class_names == () and runner.snapshot()[1].classifier == "none"
    with pytest.raises(BundleRefused):  # ZTF's features: a bundle is checked against its survey's
        ModelRunner(str(DEFAULT_NPZ), "auto", features=features)


@pytest.mark.parametrize("fused", [False, True])
def test_export_round_trip(tmp_path: Path, fused: bool) -> None:
    names = FEATURE_NAMES if fused else None
    save_bundle(seed_bundle(seed=4, feature_names=names, features_version=FEATURES_VERSION), tmp_path / "b.pt")
    rb = export_runtime(tmp_path / "b.pt", tmp_path / "b.npz")  # checks itself against torch
    assert rb.has_head == fused
    raw, feats = real_inputs(16)
    a = ModelRunner(str(tmp_path / "b.pt"), "cpu", cpu_precision="fp32").predict(raw, feats)
    b = ModelRunner(str(tmp_path / "b.npz"), "cpu").predict(raw, feats)
    for u, v in zip(a, b, strict=True):
        np.testing.assert_allclose(u, v, atol=1e-4)


@pytest.mark.parametrize("content", [b"", b"not an npz", b"PK\x03\x04broken"])
def test_broken_runtime_bundles_are_refused(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "x.npz").write_bytes(content)
    with pytest.raises(RuntimeBundleError):
        load_runtime(tmp_path / "x.npz")
    with pytest.raises(BundleRefused):
        ModelRunner(str(tmp_path / "x.npz"), "cpu")


def test_a_consumer_on_a_runtime_bundle_never_imports_torch() -> None:
    code = (
        "import sys, numpy as np\n"
        "from consumer.inference import ModelRunner\n"
        "import consumer.daemon, consumer.cli, consumer.redis_sink, consumer.kafka_sink, alerts.message\n"
        f"r = ModelRunner({str(DEFAULT_NPZ)!r}, 'auto', threads=1)\n"
        "z, ps, p = r.predict(np.random.default_rng(0).random((3, 2, 21, 21), dtype=np.float32),\n"
        "                     np.full((3, 84), np.nan, np.float32))\n"
        "assert z.shape == (3, 42) and p.shape == (3, 5)\n"
        "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('torch'))[:5]\n"
        "print('ok')\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_hot_reload_of_a_runtime_bundle(tmp_path: Path) -> None:
    """A changed .npz is loaded between batches; a broken one is refused and the old model kept."""
    import os
    import shutil

    live = tmp_path / "live.npz"
    shutil.copy(DEFAULT_NPZ, live)
    runner = ModelRunner(str(live), "cpu", reload_check_s=0.0)
    first = runner.version
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 half a file")
    os.replace(tmp_path / "broken.npz", live)
    out = runner.maybe_reload(now=1e12)
    assert out.changed and not out.ok and runner.version == first and runner.reload_failures == 1
    save_bundle(seed_bundle(seed=5, feature_names=FEATURE_NAMES, features_version=FEATURES_VERSION), tmp_path / "n.pt")
    export_runtime(tmp_path / "n.pt", tmp_path / "n.npz")
    os.replace(tmp_path / "n.npz", live)
    out = runner.maybe_reload(now=2e12)
    assert out.ok and out.changed and runner.version != first
    raw, feats = real_inputs(4)
    assert runner.predict(raw, feats)[2].shape == (4, 5)


def test_the_shipped_int8_graph_is_faithful_and_chosen_by_auto() -> None:
    """The default runtime bundle carries an int8 graph whose fidelity, measured at export on the
    real alerts against fp32 torch, meets the targets; `auto` runs it here (the self-check passes on
    this CPU), and on generated alerts it stays close to fp32 torch."""
    rt = load_runtime(DEFAULT_NPZ)
    fid = rt.int8_fidelity
    assert rt.onnx_int8 and fid["alerts"] >= 2000
    assert fid["cosine_mean"] >= 0.999 and fid["class_equal"] >= 0.995
    runner = ModelRunner(str(DEFAULT_NPZ), "cpu", cpu_precision="auto")
    assert runner.precision == "int8" and ModelRunner(str(DEFAULT_NPZ), "cpu").precision == "fp32"
    raw, feats = real_inputs(256)
    z_i, _, p_i = runner.predict(raw, feats)
    z_t, _, p_t = ModelRunner(str(DEFAULT_PT), "cpu", cpu_precision="fp32").predict(raw, feats)
    cos = (z_t * z_i).sum(1) / np.linalg.norm(z_t, axis=1) / np.linalg.norm(z_i, axis=1)
    assert cos.mean() >= 0.999 and cos.min() >= 0.99
    assert (p_t.argmax(1) == p_i.argmax(1)).mean() >= 0.95 and np.abs(p_t - p_i).max() < 0.1


def test_an_int8_graph_this_cpu_does_not_reproduce_is_not_run(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A saturating integer kernel would move z: simulated by a stored check z that the graph does
    not give. `auto` falls back to float32 and says so; `int8` refuses the bundle."""
    import dataclasses

    from model.runtime import int8_self_check, save_runtime

    rt = load_runtime(DEFAULT_NPZ)
    assert int8_self_check(rt)[0]
    moved = rt.int8_check_z + np.random.default_rng(0).normal(0, 0.5, rt.int8_check_z.shape).astype(np.float32)
    save_runtime(dataclasses.replace(rt, int8_check_z=moved), tmp_path / "moved.npz")
    assert not int8_self_check(load_runtime(tmp_path / "moved.npz"))[0]
    with caplog.at_level("WARNING"):
        assert ModelRunner(str(tmp_path / "moved.npz"), "cpu", cpu_precision="auto").precision == "fp32"
    assert "does not reproduce" in caplog.text
    with pytest.raises(BundleRefused, match="does not reproduce"):
        ModelRunner(str(tmp_path / "moved.npz"), "cpu", cpu_precision="int8")


def test_int8_is_required_only_where_asked(tmp_path: Path) -> None:
    """A runtime bundle without an int8 graph: `auto` runs float32, `int8` refuses it. Rubin's
    shipped bundle has one (an encoder without classes: its fidelity is the cosine of z alone)."""
    from alerts.rubin_features import RUBIN_FEATURE_NAMES, RUBIN_FEATURES_VERSION
    from model.runtime import save_runtime
    from model.runtime_export import encoder_runtime

    features = (RUBIN_FEATURE_NAMES, RUBIN_FEATURES_VERSION)
    plain = encoder_runtime(seed_bundle(seed=6).build("cpu").encoder, "plain", "1", 42)
    save_runtime(plain, tmp_path / "plain.npz")
    assert not load_runtime(tmp_path / "plain.npz").onnx_int8
    assert ModelRunner(str(tmp_path / "plain.npz"), "cpu", cpu_precision="auto", features=features).precision == "fp32"
    with pytest.raises(BundleRefused, match="no int8 graph"):
        ModelRunner(str(tmp_path / "plain.npz"), "cpu", cpu_precision="int8", features=features)
    rubin = load_runtime(ROOT / "model" / "bundles" / "rubin.npz")
    assert rubin.onnx_int8 and rubin.int8_fidelity["cosine_mean"] >= 0.999 and "class_equal" not in rubin.int8_fidelity
    runner = ModelRunner(str(ROOT / "model" / "bundles" / "rubin.npz"), "cpu", cpu_precision="auto", features=features)
    assert runner.precision == "int8"
