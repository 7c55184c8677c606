"""`trainer fit --survey lsst`: Rubin's stamp encoder, trained without labels (the study's
autoencoder on Rubin science + difference crops), and its runtime bundle.

There is no labelled Rubin set, so there is no classifier: the bundle has no classes, the consumer
publishes the embedding with ``classifier: none``. The split is by diaObject (a source without one
is its own group), the reconstruction error is reported on held-out objects, and the run folder
gets a picture of crops beside their reconstructions.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alerts.cutouts import rubin_stamp_pixels
from alerts.errors import BadAlertError
from alerts.files import iter_messages
from alerts.rubin import RubinSchemaCache, decode_rubin
from alerts.rubin_schemas import WIRE_MAGIC
from config import TrainerConfig
from model.device import select_device
from model.preprocess import normalise

log = logging.getLogger("stampstream.trainer")


@dataclass(frozen=True)
class RubinStamps:
    x: np.ndarray  # (N, 2, 21, 21) float32, normalised
    source_id: np.ndarray  # (N,) int64
    group: np.ndarray  # (N,) str: the diaObjectId, or the source's own id without one
    skipped: int


def load_rubin(paths: Sequence[str | Path], limit: int | None = None) -> RubinStamps:
    """Every Rubin alert of the paths (wire ``.bin`` files or Avro container files); ZTF alerts
    and bad messages are skipped and counted."""
    cache = RubinSchemaCache()
    raws, ids, groups, seen, skipped = [], [], [], set(), 0
    for msg in iter_messages(paths):
        if msg[:1] != bytes([WIRE_MAGIC]):
            skipped += 1
            continue
        try:
            a = decode_rubin(msg, cache)
            stamp = rubin_stamp_pixels(a.science, a.difference)
        except BadAlertError as e:
            skipped += 1
            log.info("skipping bad Rubin alert (%s): %s", e.reason, e)
            continue
        if a.dia_source_id in seen:
            continue
        seen.add(a.dia_source_id)
        raws.append(stamp.pixels)
        ids.append(a.dia_source_id)
        groups.append(a.object_id or f"source:{a.dia_source_id}")
        if limit and len(ids) >= limit:
            break
    if not raws:
        raise ValueError(f"no usable Rubin alert in {list(map(str, paths))}")
    return RubinStamps(normalise(np.stack(raws)), np.array(ids, np.int64), np.array(groups), skipped)


def split_groups(groups: np.ndarray, val: float, test: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Indices of train/val/test; no group (object) in two of them."""
    uniq = np.array(sorted(set(groups.tolist())))
    order = np.random.default_rng(seed).permutation(len(uniq))
    n_test, n_val = max(1, round(len(uniq) * test)), max(1, round(len(uniq) * val))
    part = {uniq[i]: (2 if r < n_test else 1 if r < n_test + n_val else 0) for r, i in enumerate(order)}
    which = np.array([part[g] for g in groups.tolist()])
    return np.flatnonzero(which == 0), np.flatnonzero(which == 1), np.flatnonzero(which == 2)


def fit_rubin(cfg: TrainerConfig, paths: Sequence[str], run_dir: Path, smoke: bool = False) -> dict[str, Any]:
    """Train the autoencoder on Rubin crops; write encoder.pt, metrics.json, history.json and
    reconstructions.png to ``run_dir``."""
    from trainer import run_folder as rf
    from trainer.fit import reconstruction_mse, train_autoencoder

    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = select_device(cfg.device)
    data = load_rubin(paths, limit=200 if smoke else None)
    train, val, test = split_groups(data.group, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    x = torch.from_numpy(data.x)
    t0 = time.perf_counter()
    model, state = train_autoencoder(cfg, x[train], x[val], run_dir, device, max_steps=20 if smoke else None)
    rf.save_history(run_dir, state.history)
    metrics: dict[str, Any] = {
        "survey": "lsst", "alerts": len(data.source_id), "objects": len(set(data.group.tolist())),
        "skipped": data.skipped, "train": len(train), "val": len(val), "test": len(test),
        "epochs_run": state.epoch, "best_epoch": state.best_epoch, "train_s": time.perf_counter() - t0,
        "val_mse": reconstruction_mse(model, x[val], device), "test_mse": reconstruction_mse(model, x[test], device),
        # the floor a model must beat: every pixel predicted by the mean training crop
        "test_mse_mean_crop": float(((data.x[test] - data.x[train].mean(axis=0)) ** 2).mean()),
        "latent_dim": cfg.autoencoder.latent_dim, "data": list(paths), "smoke": smoke,
    }  # fmt: skip
    torch.save({"encoder": model.encoder.state_dict(), "autoencoder": cfg.autoencoder.to_dict()}, run_dir / "encoder.pt")
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    _picture(model, data.x[test][:8], run_dir / "reconstructions.png", device)
    return metrics


def _picture(model: torch.nn.Module, x: np.ndarray, path: Path, device: torch.device) -> None:
    """Held-out crops (science, difference) above their reconstructions."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with torch.no_grad():
        recon = model(torch.from_numpy(x).to(device))[0].float().cpu().numpy()
    n = len(x)
    fig, axes = plt.subplots(4, n, figsize=(1.3 * n, 5.6), squeeze=False)
    for j in range(n):
        for row, (img, title) in enumerate(((x[j, 0], "science"), (recon[j, 0], "recon."), (x[j, 1], "difference"),
                                            (recon[j, 1], "recon."))):  # fmt: skip
            ax = axes[row, j]
            ax.imshow(img, cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(title, fontsize=8)
    fig.suptitle("Rubin: held-out crops (6\" around the source, 21x21) and their reconstructions")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def export_rubin(run_dir: Path, out: Path, name: str, version: str) -> tuple[Path, Path]:
    """A Rubin run -> its bundles, both without classes: the torch bundle (``.pt``: CUDA when
    there is a GPU; a probe of zero classes, so the consumer's torch path serves it unchanged) and
    the runtime bundle (``.npz``: ONNX Runtime on the CPU, no torch), checked equal. (``trainer
    export`` then adds the int8 graph: ``trainer.quantize.export_int8``.)"""
    from model.autoencoder import Autoencoder
    from model.bundle import bundle_from_model, load_bundle, save_bundle
    from model.classifier import StampClassifier
    from model.runtime import save_runtime
    from model.runtime_export import encoder_runtime
    from model.spec import AutoencoderConfig

    ckpt = torch.load(run_dir / "encoder.pt", map_location="cpu", weights_only=True)
    ae_cfg = AutoencoderConfig.from_dict(ckpt["autoencoder"])
    model = Autoencoder(ae_cfg)
    model.encoder.load_state_dict(ckpt["encoder"])
    stamp = StampClassifier(ae_cfg, (), tta_dihedral=False)
    stamp.encoder.load_state_dict(model.encoder.state_dict())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    pt, npz = out.with_suffix(".pt"), out.with_suffix(".npz")
    bundle = bundle_from_model(stamp, name=name, version=version, metrics=metrics,
                               training_data={"survey": "lsst", "alerts": metrics.get("alerts")})  # fmt: skip
    save_bundle(bundle, pt)
    load_bundle(pt)  # its own checks: weights fit, outputs of the right shapes
    runtime = encoder_runtime(model.encoder.eval(), name, version, ae_cfg.latent_dim, source=run_dir.name)
    save_runtime(runtime, npz)
    return pt, npz


def write_rubin_report(run_dir: Path) -> Path:
    """report.md of a Rubin run: the data, the reconstruction error against the mean-crop floor,
    the learning curves and the held-out reconstructions."""
    from trainer import run_folder as rf
    from trainer.report import _curves

    m = json.loads((run_dir / "metrics.json").read_text())
    _curves(rf.load_history(run_dir), run_dir / "curves.png")
    lines = [
        f"# Rubin encoder: {run_dir.name}", "",
        f"{m['alerts']} Rubin alerts of {m['objects']} objects (split by diaObject: train {m['train']}, "
        f"val {m['val']}, test {m['test']}); {m['skipped']} skipped. No labels: no classifier.", "",
        "| held-out reconstruction MSE | value |", "|---|---|",
        f"| this encoder (latent {m['latent_dim']}, best epoch {m['best_epoch']} of {m['epochs_run']}) | {m['test_mse']:.5f} |",
        f"| floor: the mean training crop for every alert | {m['test_mse_mean_crop']:.5f} |", "",
        "![curves](curves.png)", "", "![reconstructions](reconstructions.png)", "",
    ]  # fmt: skip
    path = run_dir / "report.md"
    path.write_text("\n".join(lines))
    return path
