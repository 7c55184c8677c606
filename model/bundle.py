"""Self-describing model bundles: one file with the weights of encoder + probe, the model config,
class names, input normalisation, training data summary, metrics and code version.

Saved with ``torch.save`` and loaded with ``weights_only=True``: a bundle holds tensors and plain
Python values only, so loading one never runs code from the file.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from model.autoencoder import AutoencoderConfig
from model.classifier import CLASS_NAMES, StampClassifier
from model.preprocess import NORMALISATION

BUNDLE_FORMAT = "stampstream-bundle/1"


class BundleError(ValueError):
    """A bundle file is missing, unreadable, or does not describe a model this code can run."""


@dataclass(frozen=True)
class Bundle:
    name: str
    version: str
    model_config: AutoencoderConfig
    class_names: tuple[str, ...]
    tta_dihedral: bool
    normalisation: dict[str, Any]
    encoder_state: dict[str, torch.Tensor]
    probe_state: dict[str, torch.Tensor]
    training_data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    code_version: str = ""
    created_at: str = ""

    def build(self, device: torch.device | str = "cpu") -> StampClassifier:
        model = StampClassifier(self.model_config, self.class_names, self.tta_dihedral)
        model.encoder.load_state_dict(self.encoder_state)
        model.probe.load_state_dict(self.probe_state)
        return model.to(device).eval()


def code_version() -> str:
    """git describe of the checkout when there is one, else the package version."""
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=5, check=True,
        )  # fmt: skip
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return os.environ.get("STAMPSTREAM_VERSION", "0.1.0")


def bundle_from_model(
    model: StampClassifier,
    *,
    name: str,
    version: str,
    training_data: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
) -> Bundle:
    return Bundle(
        name=name,
        version=version,
        model_config=model.cfg,
        class_names=tuple(model.class_names),
        tta_dihedral=model.tta_dihedral,
        normalisation=dict(NORMALISATION),
        encoder_state={k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()},
        probe_state={k: v.detach().cpu().clone() for k, v in model.probe.state_dict().items()},
        training_data=training_data or {},
        metrics=metrics or {},
        code_version=code_version(),
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    )


def save_bundle(bundle: Bundle, path: str | os.PathLike[str]) -> None:
    """Write atomically (temp file + rename), so a consumer watching the path never reads half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "format": BUNDLE_FORMAT,
        "name": bundle.name,
        "version": bundle.version,
        "model_config": bundle.model_config.to_dict(),
        "class_names": list(bundle.class_names),
        "tta_dihedral": bundle.tta_dihedral,
        "normalisation": bundle.normalisation,
        "encoder_state": bundle.encoder_state,
        "probe_state": bundle.probe_state,
        "training_data": bundle.training_data,
        "metrics": bundle.metrics,
        "code_version": bundle.code_version,
        "created_at": bundle.created_at,
    }
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_bundle(path: str | os.PathLike[str]) -> Bundle:
    """Read and check a bundle; raises BundleError with the reason on anything wrong."""
    try:
        payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise BundleError(f"bundle not found: {path}") from e
    except Exception as e:
        raise BundleError(f"bundle {path} is not readable: {type(e).__name__}: {e}") from e
    if not isinstance(payload, dict) or payload.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{path} is not a {BUNDLE_FORMAT} file")
    try:
        bundle = Bundle(
            name=str(payload["name"]),
            version=str(payload["version"]),
            model_config=AutoencoderConfig.from_dict(payload["model_config"]),
            class_names=tuple(payload["class_names"]),
            tta_dihedral=bool(payload["tta_dihedral"]),
            normalisation=dict(payload["normalisation"]),
            encoder_state=dict(payload["encoder_state"]),
            probe_state=dict(payload["probe_state"]),
            training_data=dict(payload.get("training_data", {})),
            metrics=dict(payload.get("metrics", {})),
            code_version=str(payload.get("code_version", "")),
            created_at=str(payload.get("created_at", "")),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: malformed bundle: {e}") from e
    if bundle.normalisation.get("method") != NORMALISATION["method"]:
        raise BundleError(f"{path}: normalisation {bundle.normalisation} is not supported by this code")
    try:
        model = bundle.build("cpu")
        with torch.no_grad():
            z, p = model(torch.zeros(1, 2, 21, 21))
    except Exception as e:
        raise BundleError(f"{path}: weights do not fit the model config: {e}") from e
    if z.shape[1] != bundle.model_config.latent_dim or p.shape[1] != len(bundle.class_names):
        raise BundleError(f"{path}: output shapes {tuple(z.shape)}, {tuple(p.shape)} do not fit the config")
    return bundle


def seed_bundle(latent_dim: int = 42, seed: int = 0) -> Bundle:
    """The untrained seed architecture (random weights): for tests and a first run without a trained model."""
    torch.manual_seed(seed)
    model = StampClassifier(AutoencoderConfig(latent_dim=latent_dim), CLASS_NAMES, False)
    return bundle_from_model(model, name="seed-untrained", version="0", training_data={"alerts": 0})
