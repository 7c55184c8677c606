"""Trainer: augmentations, splits by object, a tiny training run that lowers the loss, and the
fit -> report -> export -> consumer bundle chain through the CLI."""

from __future__ import annotations

import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch

from alerts.features import FEATURE_NAMES
from alerts.synthetic import make_alert
from config import TrainerConfig
from config.trainer import HeadConfig
from consumer.inference import ModelRunner
from model.bundle import load_bundle
from trainer.augment import random_dihedral, random_shift, tile_shuffle
from trainer.comparison import END_TO_END_ROW, FUSED_ROW, REFERENCE_ROW, STUDY_ROW
from trainer.data import UNLABELLED, load_dataset, read_labels, split_by_object
from trainer.export import export_bundle
from trainer.fit import run_fit
from trainer.stages import STAGES

ROOT = Path(__file__).resolve().parents[2]
SMALL_HEAD = HeadConfig(max_iter=20, max_depth=3, cv_seeds=1, cv_folds=2, inner_folds=2)
KIND_LABEL = {"point": "VS", "extended": "SN", "streak": "asteroid", "none": "bogus"}


def test_random_dihedral_keeps_pixels_and_shape() -> None:
    x = torch.rand(64, 2, 21, 21)
    y = random_dihedral(x, torch.Generator().manual_seed(0))
    assert y.shape == x.shape
    for i in range(len(x)):
        assert torch.equal(torch.sort(x[i].flatten())[0], torch.sort(y[i].flatten())[0])
    assert not torch.equal(x, y)


DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


@pytest.mark.parametrize("device", DEVICES)
def test_random_dihedral_gives_each_stamp_its_drawn_view(device: str) -> None:
    from model.autoencoder import dihedral_views

    x = torch.rand(40, 2, 21, 21, device=device)
    y = random_dihedral(x, torch.Generator().manual_seed(3))
    k = torch.randint(0, 8, (40,), generator=torch.Generator().manual_seed(3))  # the same draw
    for i in range(len(x)):
        assert torch.equal(y[i], dihedral_views(x[i : i + 1])[int(k[i])][0])
    assert len(set(k.tolist())) == 8


@pytest.mark.parametrize("device", DEVICES)
def test_random_shift_moves_whole_stamps_within_the_bound(device: str) -> None:
    x = torch.rand(200, 2, 21, 21, device=device)
    assert torch.equal(random_shift(x, 0), x)
    y = random_shift(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="replicate")
    seen = set()
    for i in range(len(x)):
        (match,) = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(y[i], padded[i, :, dy : dy + 21, dx : dx + 21])]
        seen.add(match)
    assert len(seen) == 25  # every offset in [-2, 2]^2 is drawn


def test_projection_head_is_trained_checkpointed_and_resumed(tmp_path: Path) -> None:
    from trainer.fit import train_autoencoder

    x = torch.rand(48, 2, 21, 21)
    cfg = TrainerConfig(device="cpu").with_overrides(latent_dim=8, extra_objective="contrastive", extra_weight=1.0,
                                                     projection_dim=4, view_shift=1, max_epochs=2, batch_size=16, lr=1e-3)  # fmt: skip
    _, state = train_autoencoder(cfg, x[:32], x[32:], tmp_path, torch.device("cpu"), show_progress=False)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state.epoch == 2 and ckpt["projection"]["net.2.weight"].shape == (4, 128)
    before = {k: v.clone() for k, v in ckpt["projection"].items()}
    _, state = train_autoencoder(dataclasses.replace(cfg, max_epochs=3), x[:32], x[32:], tmp_path, torch.device("cpu"),
                                 show_progress=False)  # fmt: skip
    after = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state.epoch == 3 and not torch.equal(after["projection"]["net.0.weight"], before["net.0.weight"])
    del after["projection"]  # a resume reads the head back: without it, it refuses
    torch.save(after, tmp_path / "checkpoint.pt")
    with pytest.raises(KeyError, match="projection"):
        train_autoencoder(dataclasses.replace(cfg, max_epochs=4), x[:32], x[32:], tmp_path, torch.device("cpu"), show_progress=False)


def test_tile_shuffle_permutes_whole_tiles() -> None:
    x = torch.rand(16, 2, 21, 21)
    y = tile_shuffle(x, 3, p=1.0, generator=torch.Generator().manual_seed(0))
    for i in range(len(x)):
        tiles_x = {tuple(x[i, :, r : r + 7, c : c + 7].flatten().tolist()) for r in (0, 7, 14) for c in (0, 7, 14)}
        tiles_y = {tuple(y[i, :, r : r + 7, c : c + 7].flatten().tolist()) for r in (0, 7, 14) for c in (0, 7, 14)}
        assert tiles_x == tiles_y
    assert torch.equal(tile_shuffle(x, 3, p=0.0), x)


@pytest.fixture(scope="module")
def alert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 generated alerts of 60 objects (2 alerts each), 4 kinds, and their labels.csv."""
    d = tmp_path_factory.mktemp("alerts")
    (d / "alerts").mkdir()
    kinds = list(KIND_LABEL)
    rows = []
    for i in range(120):
        candid = 2_400_000_000_000_100_000 + i
        kind = kinds[(i // 2) % 4]
        a = make_alert(candid, object_id=f"ZTF25obj{i // 2:04d}", kind=kind)
        (d / "alerts" / f"{candid}.avro").write_bytes(a.message)
        rows.append({"candid": candid, "objectId": a.object_id, "label": KIND_LABEL[kind]})
    with open(d / "labels.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["candid", "objectId", "label"])
        w.writeheader()
        w.writerows(rows)
    return d


def test_split_by_object_has_no_shared_object(alert_dir: Path) -> None:
    ds = load_dataset([alert_dir / "alerts"], read_labels(alert_dir / "labels.csv"))
    assert len(ds) == 120 and (ds.y != UNLABELLED).all()
    s = split_by_object(ds, 0.15, 0.25, seed=1)
    objs = [set(ds.object_id[idx].tolist()) for idx in (s.train, s.val, s.test)]
    assert not (objs[0] & objs[1]) and not (objs[0] & objs[2]) and not (objs[1] & objs[2])
    assert len(s.train) + len(s.val) + len(s.test) == len(ds)
    for idx in (s.train, s.val, s.test):
        assert set(ds.y[idx].tolist()) == {1, 2, 3, 4}  # SN, VS, asteroid, bogus: every class in every split


def test_the_first_detection_views_read_the_earliest_detection(alert_dir: Path) -> None:
    """The generated alerts are at 18.5 with three earlier detections at 19.0 in their history: the
    first-detection view (stage 1) has the earliest detection's magnitude and no earlier
    detection, the later views keep the alert's own."""
    ds = load_dataset([alert_dir / "alerts"], read_labels(alert_dir / "labels.csv"))
    mag, n_det = FEATURE_NAMES.index("magpsf"), FEATURE_NAMES.index("all_n_det")
    assert STAGES[0] == 1 and (ds.features[:, mag] == 18.5).all() and (ds.features[:, n_det] == 4).all()
    assert (ds.stages[0][:, mag] == 19.0).all() and (ds.stages[0][:, n_det] == 1).all()
    assert (ds.stages[1][:, mag] == 18.5).all() and (ds.stages[1][:, n_det] == 2).all()


def test_tiny_training_lowers_the_loss_and_exports_a_bundle(alert_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset([alert_dir / "alerts"], read_labels(alert_dir / "labels.csv"))
    cfg = TrainerConfig().with_overrides(head=SMALL_HEAD, max_epochs=6, lr=1e-3, batch_size=16, probe_epochs=100, device="cpu", latent_dim=8)
    metrics = run_fit(cfg, ds, tmp_path / "run", show_progress=False)
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert hist[-1]["train_mse"] < hist[0]["train_mse"] * 0.8, hist
    assert hist[-1]["val_mse"] < hist[0]["val_mse"], hist
    # the four generated kinds are easy: a working encoder + probe must beat chance (25 %) by far
    best = max(metrics["probe"]["macro_f1"], metrics["probe_tta"]["macro_f1"])
    assert best > 0.6, metrics["probe"]
    bundle = export_bundle(tmp_path / "run", tmp_path / "b.pt", version="t1")
    back = load_bundle(tmp_path / "b.pt")
    assert back.version == "t1" and back.model_config.latent_dim == 8
    assert back.training_data["alerts"] == 120 and "leakage_guard" in back.training_data
    # the fused head reads the plain z (trainer config head.embedding), so the bundle computes that
    assert back.tta_dihedral is False and back.metrics["macro_f1"] == pytest.approx(metrics["probe"]["macro_f1"])
    assert back.code_version == bundle.code_version
    # the fused classifier: its cross-validated table keeps the study's row, and the bundle ships it
    rows = metrics["classifier"]["rows"]
    assert STUDY_ROW in rows and FUSED_ROW in rows and REFERENCE_ROW in rows
    assert rows[FUSED_ROW]["macro_f1_mean"] > 0.6, rows
    assert rows[END_TO_END_ROW]["macro_f1_mean"] > 0.5, rows  # the encoder fine-tuned with the features learns too
    assert back.head is not None and back.head.feature_names == FEATURE_NAMES
    runner = ModelRunner(str(tmp_path / "b.pt"), "cpu")
    assert runner.snapshot()[1].classifier == "fused"
    z, stamp, p = runner.predict(np.nan_to_num(ds.x[:5]), ds.features[:5])
    assert z.shape == (5, 8) and np.allclose(p.sum(1), 1, atol=1e-5) and not np.allclose(p, stamp)


def test_resume_continues_from_the_checkpoint(alert_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset([alert_dir / "alerts"], read_labels(alert_dir / "labels.csv"))
    cfg = TrainerConfig().with_overrides(head=SMALL_HEAD, max_epochs=2, lr=1e-3, batch_size=16, probe_epochs=10, device="cpu", latent_dim=8)
    run_fit(cfg, ds, tmp_path / "run", show_progress=False, baseline=False)
    more = dataclasses.replace(cfg, max_epochs=4)
    run_fit(more, ds, tmp_path / "run", show_progress=False, baseline=False)
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert [h["epoch"] for h in hist] == [0, 1, 2, 3]


def test_cli_fit_report_export_smoke(alert_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    py = [sys.executable, "-m", "trainer.cli"]
    kw = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": 600}
    more = tmp_path / "unlabelled"  # alerts of 6 objects without a label, beside the labelled ones
    more.mkdir()
    for i, kind in enumerate(list(KIND_LABEL) + ["point", "streak"]):
        (more / f"{i}.avro").write_bytes(make_alert(2_400_000_000_000_900_000 + i, object_id=f"ZTF25new{i:04d}", kind=kind).message)
    res = subprocess.run([*py, "fit", "--data", str(alert_dir / "alerts"), str(more), "--out", str(run), "--smoke", "--device", "cpu"], **kw)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fit done" in res.stdout
    calls = json.loads((run / "classifier.json").read_text())["unlabelled"]  # what the head calls them
    assert calls["alerts"] == 6 and sum(sum(g["called"].values()) for g in calls["groups"]) == 6
    res = subprocess.run([*py, "report", str(run)], **kw)
    assert res.returncode == 0, res.stderr[-2000:]
    report = (run / "report.md").read_text()
    assert "By detections so far" in report  # the fused classifier on earlier views of the labelled alerts
    assert "What it calls the alerts nobody labelled" in report
    for png in ("curves.png", "confusion.png", "latent_umap.png", "reconstructions.png", "stages.png", "unlabelled.png"):
        assert png in report
        img = plt.imread(run / png)  # a real PNG, of a plausible size, with something drawn on it
        assert img.ndim == 3 and min(img.shape[:2]) >= 200
        assert img[..., :3].std() > 0.02, f"{png} is blank"
    assert "macro" in report and "raw pixels" not in report  # smoke skips the raw-pixel baseline
    res = subprocess.run([*py, "export", str(run), "--out", str(tmp_path / "bundle.pt")], **kw)
    assert res.returncode == 0, res.stderr[-2000:]
    assert load_bundle(tmp_path / "bundle.pt").name == "stampstream-ae"
    assert "int8 graph" in res.stdout  # added, or below the fidelity targets: either way said
    from model.runtime import load_runtime

    rt = load_runtime(tmp_path / "bundle.npz")
    assert rt.name == "stampstream-ae" and (not rt.onnx_int8 or rt.int8_fidelity["cosine_mean"] >= 0.999)
    _refit_on_the_bundles_encoder(alert_dir, tmp_path, tmp_path / "bundle.pt")


def _refit_on_the_bundles_encoder(alert_dir: Path, tmp_path: Path, first: Path) -> None:
    """`trainer fit --encoder BUNDLE`: the probe and the classifier are fitted on that bundle's
    encoder, taken weight for weight, so the new bundle publishes the same embeddings; its
    architecture wins over the config's (latent 8 here against the bundle's), no decoder is
    trained or scored, and the new bundle says whose encoder it carries."""
    run = tmp_path / "refit"
    cfg = tmp_path / "other.yaml"
    cfg.write_text("autoencoder:\n  latent_dim: 8\n")
    py = [sys.executable, "-m", "trainer.cli"]
    kw = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": 600}
    res = subprocess.run([*py, "fit", "--config", str(cfg), "--data", str(alert_dir / "alerts"), "--out", str(run),
                          "--smoke", "--device", "cpu", "--encoder", str(first)], **kw)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    assert "not trained" in res.stdout
    assert json.loads((run / "history.json").read_text()) == []
    res = subprocess.run([*py, "report", str(run)], **kw)
    assert res.returncode == 0, res.stderr[-2000:]
    report = (run / "report.md").read_text()
    assert "not trained in this run" in report and "curves.png" not in report and "reconstructions.png" not in report
    assert not (run / "curves.png").exists() and "By detections so far" in report
    res = subprocess.run([*py, "export", str(run), "--out", str(tmp_path / "refit.pt"), "--version", "r1", "--no-int8"], **kw)
    assert res.returncode == 0, res.stderr[-2000:]
    a, b = load_bundle(first), load_bundle(tmp_path / "refit.pt")
    assert b.model_config == a.model_config and b.model_config.latent_dim != 8
    assert a.encoder_state.keys() == b.encoder_state.keys()
    assert all(torch.equal(a.encoder_state[k], b.encoder_state[k]) for k in a.encoder_state)
    assert b.training_data["encoder_from"]["version"] == a.version and b.metrics["test_mse"] is None
    assert b.head is not None
    x = torch.rand(4, 2, 21, 21)
    with torch.no_grad():
        assert torch.equal(a.build()(x)[0], b.build()(x)[0])


def test_cli_rubin_fit_report_export(tmp_path: Path) -> None:
    """`trainer fit --survey lsst` on generated Rubin alerts (no labels): the encoder, its report,
    and the two bundles without classes, which the consumer's runner serves."""
    from alerts.synthetic_rubin import make_rubin_message

    data = tmp_path / "rubin"
    data.mkdir()
    for i in range(24):
        (data / f"a{i}.bin").write_bytes(make_rubin_message(1000 if i % 2 else 1100, 50 + i, seed=i, n_prv=i % 4))
    run = tmp_path / "run"
    py = [sys.executable, "-m", "trainer.cli"]
    kw = {"cwd": ROOT, "capture_output": True, "text": True, "timeout": 600}
    res = subprocess.run([*py, "fit", "--survey", "lsst", "--data", str(data), "--out", str(run), "--smoke", "--device", "cpu"], **kw)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "fit done (lsst): 24 alerts" in res.stdout
    assert subprocess.run([*py, "report", str(run)], **kw).returncode == 0
    assert "mean training crop" in (run / "report.md").read_text()
    assert plt.imread(run / "reconstructions.png")[..., :3].std() > 0.02
    res = subprocess.run([*py, "export", str(run), "--out", str(tmp_path / "rubin.pt"), "--name", "r"], **kw)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "int8 graph against fp32 torch" in res.stdout and "(no classes)" in res.stdout  # measured, kept or not
    from alerts.rubin_features import RUBIN_FEATURE_NAMES, RUBIN_FEATURES_VERSION
    from consumer.inference import ModelRunner

    for name in ("rubin.pt", "rubin.npz"):
        runner = ModelRunner(str(tmp_path / name), "cpu", features=(RUBIN_FEATURE_NAMES, RUBIN_FEATURES_VERSION))
        assert runner.name == "r" and runner.class_names == ()


@pytest.mark.parametrize(("kind", "objective"), [("ae", "invariance"), ("ae", "contrastive"), ("vae", "none")])
def test_variants_train(alert_dir: Path, tmp_path: Path, kind: str, objective: str) -> None:
    ds = load_dataset([alert_dir / "alerts"], read_labels(alert_dir / "labels.csv"))
    cfg = TrainerConfig().with_overrides(head=SMALL_HEAD, max_epochs=3, lr=1e-3, batch_size=16, probe_epochs=20, device="cpu",
                              latent_dim=8, kind=kind, extra_objective=objective, augment="flips_rotations_tiles")  # fmt: skip
    run_fit(cfg, ds, tmp_path / "run", show_progress=False, baseline=False)
    hist = json.loads((tmp_path / "run" / "history.json").read_text())
    assert all(np.isfinite(h["train_loss"]) for h in hist)
    assert hist[-1]["val_mse"] < hist[0]["val_mse"]


def test_view_losses() -> None:
    from trainer.fit import view_loss

    z = torch.randn(16, 8)
    assert view_loss(z, z, "invariance").item() == 0.0
    assert view_loss(z, z, "contrastive").item() < view_loss(z, torch.randn(16, 8), "contrastive").item()


def test_history_separates_loss_and_reconstruction_mse(alert_dir: Path, tmp_path: Path) -> None:
    ds = load_dataset([alert_dir / "alerts"], read_labels(alert_dir / "labels.csv"))
    cfg = TrainerConfig().with_overrides(head=SMALL_HEAD, max_epochs=1, lr=1e-3, batch_size=16, probe_epochs=5, device="cpu",
                              latent_dim=8, extra_objective="contrastive")  # fmt: skip
    run_fit(cfg, ds, tmp_path / "run", show_progress=False, baseline=False)
    (h,) = json.loads((tmp_path / "run" / "history.json").read_text())
    assert 0 < h["train_mse"] < h["train_loss"]  # the total adds the (positive) contrastive term


def test_sweep_only_runs_the_chosen_rows(alert_dir: Path, tmp_path: Path) -> None:
    from trainer.sweep import run_sweep

    out = tmp_path / "sweep"
    table = run_sweep(TrainerConfig(device="cpu"), [str(alert_dir / "alerts")], str(alert_dir / "labels.csv"), out,
                      seeds=1, jobs=1, smoke=True, limit=200, only="8-16 channels")  # fmt: skip
    (run,) = [p.name for p in out.iterdir() if p.is_dir()]
    assert run.startswith("channels-8x16_extra_objective-contrastive")
    rows = [line for line in table.splitlines() if line.startswith("| AE") or line.startswith("| z=")]
    assert len(rows) == 1 and "8-16 channels" in rows[0]
    assert "**beyond the study**" in table and "**latent dim**" not in table  # no empty sections


def test_the_fusion_fits_how_much_to_trust_the_trees() -> None:
    """Over-confident tree log-odds (4x the true ones) and an informative z: the fusion scales the
    trees down (~1/4) and returns the same logits divided by that scale."""
    from trainer.classify import _fit_fusion

    rng = np.random.default_rng(0)
    n, k = 2000, 3
    y = rng.integers(0, k, n)
    true_logits = rng.normal(0, 1, (n, k))
    true_logits[np.arange(n), y] += 1.5
    z = rng.normal(0, 1, (n, 6))
    z[:, :k] += 0.8 * np.eye(k)[y]  # z carries the class too
    offset = 4.0 * (true_logits - np.log(np.exp(true_logits).sum(1, keepdims=True)))
    w, b, mean, std, scale = _fit_fusion(offset, z, y, k, l2=1e-3, offsets=False)
    assert 0.1 < scale < 0.5, scale
    fused = offset + ((z - mean) / std) @ w.T + b
    acc_trees = (offset.argmax(1) == y).mean()
    assert (fused.argmax(1) == y).mean() > acc_trees + 0.02  # z corrects the trees


def test_the_fusion_fits_class_offsets_only_when_asked() -> None:
    """Trees whose log-odds favour class 0 by a constant: with offsets the fusion learns to take it
    back (b[0] below the others); without them b stays 0 and the trees' balance is kept."""
    from trainer.classify import _fit_fusion

    rng = np.random.default_rng(1)
    n, k = 1500, 3
    y = rng.integers(0, k, n)
    logits = rng.normal(0, 1, (n, k))
    logits[np.arange(n), y] += 2.0
    logits[:, 0] += 1.5  # the trees' bias toward class 0
    offset = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    z = rng.normal(0, 1, (n, 4))  # z carries nothing
    _, b_off, *_ = _fit_fusion(offset, z, y, k, l2=1.0, offsets=False)
    _, b_on, *_ = _fit_fusion(offset, z, y, k, l2=1.0, offsets=True)
    assert np.array_equal(b_off, np.zeros(k))
    assert b_on[0] < min(b_on[1], b_on[2]) - 0.5, b_on
