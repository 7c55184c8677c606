"""The run folder of ``trainer fit``, typed: one module writes and reads every file in it, so fit,
report, export and sweep agree on its format by construction.

| file | written | holds |
|---|---|---|
| ``config.json`` | at start | ``RunConfig``: trainer config, data paths, smoke flag |
| ``split.json`` | at start | candids of the train / val / test objects |
| ``checkpoint.pt`` | every epoch | training state, for ``--resume`` (tensors and plain values only) |
| ``history.json`` | after training | one ``dict`` per epoch (loss, MSE, seconds) |
| ``model.pt`` | at the end | ``RunWeights``: autoencoder and probes (loaded with weights_only=True) |
| ``embeddings.npz`` | at the end | ``RunEmbeddings``: z of every alert, labels, test predictions |
| ``examples.npz`` | at the end | ``RunExamples``: a few test stamps for the report |
| ``classifier.json`` | after the evaluation | cross-validated table of the classifier rows |
| ``head.pt`` | after the evaluation | the fused head (``model.bundle.HeadSpec`` payload) |
| ``metrics.json`` | last | the evaluation; its presence marks a finished run |
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from config.trainer import TrainerConfig, trainer_config_from_dict
from model.bundle import HeadSpec
from model.spec import AutoencoderConfig

CONFIG = "config.json"
SPLIT = "split.json"
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
WEIGHTS = "model.pt"
EMBEDDINGS = "embeddings.npz"
EXAMPLES = "examples.npz"
METRICS = "metrics.json"
CLASSIFIER = "classifier.json"
HEAD = "head.pt"


@dataclass(frozen=True)
class RunConfig:
    trainer: TrainerConfig
    data: list[str]
    smoke: bool


@dataclass(frozen=True)
class RunWeights:
    model_config: AutoencoderConfig
    autoencoder: dict[str, torch.Tensor]
    probe: dict[str, torch.Tensor]  # the better of the two below
    probe_plain: dict[str, torch.Tensor]
    probe_pooled: dict[str, torch.Tensor]
    tta_dihedral: bool  # True: the better probe reads z pooled over the 8 flips/rotations
    class_names: tuple[str, ...]


@dataclass(frozen=True)
class RunEmbeddings:
    z: np.ndarray
    y: np.ndarray
    candid: np.ndarray
    test_idx: np.ndarray  # labelled test alerts
    fit_idx: np.ndarray  # labelled train + val alerts
    test_pred: np.ndarray
    test_probs: np.ndarray
    test_all_idx: np.ndarray  # every test alert, labelled or not


@dataclass(frozen=True)
class RunExamples:
    x: np.ndarray
    y: np.ndarray
    candid: np.ndarray


def save_config(run_dir: Path, cfg: RunConfig) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    payload = {"trainer": cfg.trainer.to_dict(), "data": cfg.data, "smoke": cfg.smoke}
    (run_dir / CONFIG).write_text(json.dumps(payload, indent=2))


def load_config(run_dir: Path) -> RunConfig:
    d = json.loads((run_dir / CONFIG).read_text())
    return RunConfig(trainer_config_from_dict(d["trainer"]), list(d["data"]), bool(d["smoke"]))


def save_split(run_dir: Path, split: dict[str, list[int]]) -> None:
    (run_dir / SPLIT).write_text(json.dumps(split))


def checkpoint_path(run_dir: Path) -> Path:
    return run_dir / CHECKPOINT


def save_history(run_dir: Path, history: list[dict[str, float]]) -> None:
    (run_dir / HISTORY).write_text(json.dumps(history))


def load_history(run_dir: Path) -> list[dict[str, float]]:
    return list(json.loads((run_dir / HISTORY).read_text()))


def save_weights(run_dir: Path, w: RunWeights) -> None:
    def cpu(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in sd.items()}

    torch.save(
        {"autoencoder": cpu(w.autoencoder), "probe": cpu(w.probe), "probe_plain": cpu(w.probe_plain),
         "probe_pooled": cpu(w.probe_pooled), "model_config": w.model_config.to_dict(),
         "tta_dihedral": w.tta_dihedral, "class_names": list(w.class_names)},
        run_dir / WEIGHTS,
    )  # fmt: skip


def load_weights(run_dir: Path, device: torch.device | str = "cpu") -> RunWeights:
    d = torch.load(run_dir / WEIGHTS, map_location=device, weights_only=True)
    return RunWeights(
        AutoencoderConfig.from_dict(d["model_config"]), d["autoencoder"], d["probe"], d["probe_plain"],
        d["probe_pooled"], bool(d["tta_dihedral"]), tuple(d["class_names"]),
    )  # fmt: skip


def has_weights(run_dir: Path) -> bool:
    return (run_dir / WEIGHTS).exists()


def save_embeddings(run_dir: Path, e: RunEmbeddings) -> None:
    np.savez_compressed(run_dir / EMBEDDINGS, **{k: getattr(e, k) for k in RunEmbeddings.__dataclass_fields__})


def load_embeddings(run_dir: Path) -> RunEmbeddings:
    with np.load(run_dir / EMBEDDINGS) as f:
        return RunEmbeddings(**{k: f[k] for k in RunEmbeddings.__dataclass_fields__})


def save_examples(run_dir: Path, e: RunExamples) -> None:
    np.savez_compressed(run_dir / EXAMPLES, x=e.x, y=e.y, candid=e.candid)


def load_examples(run_dir: Path) -> RunExamples:
    with np.load(run_dir / EXAMPLES) as f:
        return RunExamples(f["x"], f["y"], f["candid"])


def save_head(run_dir: Path, head: HeadSpec, table: dict[str, Any]) -> None:
    torch.save(head.to_payload(), run_dir / HEAD)
    (run_dir / CLASSIFIER).write_text(json.dumps(table))


def load_head(run_dir: Path) -> HeadSpec | None:
    if not (run_dir / HEAD).exists():
        return None
    return HeadSpec.from_payload(torch.load(run_dir / HEAD, map_location="cpu", weights_only=True))


def load_classifier_table(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / CLASSIFIER
    return dict(json.loads(path.read_text())) if path.exists() else None


def save_metrics(run_dir: Path, metrics: dict[str, Any]) -> None:
    (run_dir / METRICS).write_text(json.dumps(metrics, indent=2))


def load_metrics(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / METRICS).read_text()))


def is_finished(run_dir: Path) -> bool:
    return (run_dir / METRICS).exists()


@dataclass(frozen=True)
class Run:
    """A finished run, as ``load_run`` reads it back."""

    path: Path
    config: RunConfig
    history: list[dict[str, float]]
    metrics: dict[str, Any]
    weights: RunWeights
    embeddings: RunEmbeddings
    examples: RunExamples


def save_run(run: Run) -> None:
    """Everything of a finished run; metrics last, since they mark the run finished."""
    save_config(run.path, run.config)
    save_history(run.path, run.history)
    save_weights(run.path, run.weights)
    save_embeddings(run.path, run.embeddings)
    save_examples(run.path, run.examples)
    save_metrics(run.path, run.metrics)


def load_run(run_dir: Path) -> Run:
    return Run(
        run_dir, load_config(run_dir), load_history(run_dir), load_metrics(run_dir), load_weights(run_dir),
        load_embeddings(run_dir), load_examples(run_dir),
    )  # fmt: skip
