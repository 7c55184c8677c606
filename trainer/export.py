"""`trainer export`: a run folder -> the self-describing bundle the consumer loads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.autoencoder import AutoencoderConfig
from model.bundle import Bundle, bundle_from_model, save_bundle
from model.classifier import StampClassifier


def classifier_from_run(run_dir: Path, pooled: bool | None = None) -> StampClassifier:
    """The encoder and a probe of a run: the better one (pooled None), or the one asked for."""
    saved = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    cfg = AutoencoderConfig.from_dict(saved["model_config"])
    use_pooled = bool(saved["tta_dihedral"]) if pooled is None else pooled
    model = StampClassifier(cfg, tuple(saved["class_names"]), use_pooled)
    enc = {k[len("encoder."):]: v for k, v in saved["autoencoder"].items() if k.startswith("encoder.")}
    model.encoder.load_state_dict(enc)
    key = "probe" if pooled is None else ("probe_pooled" if pooled else "probe_plain")
    model.probe.load_state_dict(saved[key])
    return model.eval()


def export_bundle(
    run_dir: Path, out: Path, name: str = "stampstream-ae", version: str | None = None, pooled: bool | None = None
) -> Bundle:
    """pooled: None keeps the run's better embedding; True/False forces the 8-fold pooled z (8x the
    inference cost) or the plain z."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    use_pooled = metrics["tta_dihedral"] if pooled is None else pooled
    probe = metrics["probe_tta" if use_pooled else "probe"]
    summary = {
        "macro_f1": probe["macro_f1"], "macro_precision": probe["macro_precision"], "macro_recall": probe["macro_recall"],
        "accuracy": probe["accuracy"], "test_mse": metrics["test_mse"],
        "knn_accuracy": metrics["knn_tta" if use_pooled else "knn"]["accuracy"],
        "raw_pixels_logreg_macro_f1": metrics.get("raw_pixels_logreg", {}).get("macro_f1"),
        "per_class": probe["per_class"],
    }  # fmt: skip
    training = metrics["data"] | {"splits": metrics["splits"], "paths": config["data"], "trainer": config["trainer"],
                                   "leakage_guard": metrics["leakage_guard"]}  # fmt: skip
    bundle = bundle_from_model(
        classifier_from_run(run_dir, pooled), name=name, version=version or run_dir.name, training_data=training, metrics=summary
    )
    save_bundle(bundle, out)
    return bundle
