"""`trainer export`: a run folder -> the self-describing bundle the consumer loads: encoder, the
study's stamp probe and (when the run trained one) the fused head with its feature list."""

from __future__ import annotations

from pathlib import Path

from model.bundle import Bundle, bundle_from_model, save_bundle
from model.classifier import StampClassifier
from trainer import run_folder as rf


def classifier_from_run(run_dir: Path, pooled: bool | None = None) -> StampClassifier:
    """The encoder and a probe of a run: the better one (pooled None), or the one asked for."""
    w = rf.load_weights(run_dir)
    use_pooled = w.tta_dihedral if pooled is None else pooled
    model = StampClassifier(w.model_config, w.class_names, use_pooled)
    enc = {k[len("encoder."):]: v for k, v in w.autoencoder.items() if k.startswith("encoder.")}
    model.encoder.load_state_dict(enc)
    model.probe.load_state_dict(w.probe if pooled is None else (w.probe_pooled if pooled else w.probe_plain))
    return model.eval()


def export_bundle(
    run_dir: Path, out: Path, name: str = "stampstream-ae", version: str | None = None, pooled: bool | None = None
) -> Bundle:
    """pooled: None keeps the run's better embedding; True/False forces the 8-fold pooled z (8x the
    inference cost) or the plain z."""
    metrics = rf.load_metrics(run_dir)
    config = rf.load_config(run_dir)
    head = rf.load_head(run_dir)
    if head is not None and pooled is None:  # the head was fitted on one embedding: the bundle computes that one
        pooled = head.config.get("embedding", "plain") == "pooled"
    use_pooled = metrics["tta_dihedral"] if pooled is None else pooled
    probe = metrics["probe_tta" if use_pooled else "probe"]
    summary = {
        "macro_f1": probe["macro_f1"], "macro_precision": probe["macro_precision"], "macro_recall": probe["macro_recall"],
        "accuracy": probe["accuracy"], "test_mse": metrics["test_mse"],
        "knn_accuracy": metrics["knn_tta" if use_pooled else "knn"]["accuracy"],
        "raw_pixels_logreg_macro_f1": metrics.get("raw_pixels_logreg", {}).get("macro_f1"),
        "per_class": probe["per_class"],
    }  # fmt: skip
    training = metrics["data"] | {"splits": metrics["splits"], "paths": config.data, "trainer": config.trainer.to_dict(),
                                   "leakage_guard": metrics["leakage_guard"]}  # fmt: skip
    if "encoder_from" in metrics:  # the encoder was not trained in this run: say whose it is
        training["encoder_from"] = metrics["encoder_from"]
    if head is not None and use_pooled != (head.config.get("embedding", "plain") == "pooled"):
        raise ValueError("the fused head was fitted on the other embedding: export it with --pooling auto")
    if head is not None:
        summary["classifier"] = head.metrics
    bundle = bundle_from_model(
        classifier_from_run(run_dir, pooled), name=name, version=version or run_dir.name, training_data=training,
        metrics=summary, head=head,
    )  # fmt: skip
    save_bundle(bundle, out)
    return bundle
