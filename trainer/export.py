"""`trainer export`: a run folder -> the self-describing bundle the consumer loads."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from model.autoencoder import AutoencoderConfig
from model.bundle import Bundle, bundle_from_model, save_bundle
from model.classifier import StampClassifier


def classifier_from_run(run_dir: Path) -> StampClassifier:
    saved = torch.load(run_dir / "model.pt", map_location="cpu", weights_only=True)
    cfg = AutoencoderConfig.from_dict(saved["model_config"])
    model = StampClassifier(cfg, tuple(saved["class_names"]), bool(saved["tta_dihedral"]))
    enc = {k[len("encoder."):]: v for k, v in saved["autoencoder"].items() if k.startswith("encoder.")}
    model.encoder.load_state_dict(enc)
    model.probe.load_state_dict(saved["probe"])
    return model.eval()


def export_bundle(run_dir: Path, out: Path, name: str = "stampstream-ae", version: str | None = None) -> Bundle:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    config = json.loads((run_dir / "config.json").read_text())
    probe = metrics["probe_tta" if metrics["tta_dihedral"] else "probe"]
    summary = {
        "macro_f1": probe["macro_f1"], "macro_precision": probe["macro_precision"], "macro_recall": probe["macro_recall"],
        "accuracy": probe["accuracy"], "test_mse": metrics["test_mse"],
        "knn_accuracy": metrics["knn_tta" if metrics["tta_dihedral"] else "knn"]["accuracy"],
        "raw_pixels_logreg_macro_f1": metrics.get("raw_pixels_logreg", {}).get("macro_f1"),
        "per_class": probe["per_class"],
    }  # fmt: skip
    training = metrics["data"] | {"splits": metrics["splits"], "paths": config["data"], "trainer": config["trainer"],
                                   "leakage_guard": metrics["leakage_guard"]}  # fmt: skip
    bundle = bundle_from_model(
        classifier_from_run(run_dir), name=name, version=version or run_dir.name, training_data=training, metrics=summary
    )
    save_bundle(bundle, out)
    return bundle
