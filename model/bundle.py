"""Self-describing model bundles: one file with the weights of encoder + stamp probe, optionally
the fused head (tree ensemble as tensors + the linear stamp correction + temperature) with the
list of features it reads, their version and how they are normalised, the model config, class
names, input normalisation, training data summary, metrics and code version.

Saved with ``torch.save`` and loaded with ``weights_only=True``: a bundle holds tensors and plain
Python values only, so loading one never runs code from the file. Format 1 (stamp probe only)
still loads; its classes are the probe's.
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
from model.fused import AlertModel, FusedHead
from model.preprocess import NORMALISATION
from model.trees import TreeEnsemble

BUNDLE_FORMAT = "stampstream-bundle/2"
READABLE_FORMATS = ("stampstream-bundle/1", BUNDLE_FORMAT)


@dataclass(frozen=True)
class HeadSpec:
    """The fused head of a bundle: what it reads and its weights."""

    feature_names: tuple[str, ...]
    features_version: int
    # How the features reach the head: raw float32, NaN = missing (the trees route NaN by the
    # direction learnt for each split); no scaling is applied.
    feature_normalisation: str
    tree_shape: tuple[int, int, int, int]  # (trees, nodes per tree, classes, depth)
    state: dict[str, torch.Tensor]  # FusedHead.state_dict()
    config: dict[str, Any] = field(default_factory=dict)  # training settings
    metrics: dict[str, Any] = field(default_factory=dict)  # cross-validated scores, calibration

    def build(self, latent_dim: int) -> FusedHead:
        n_trees, n_nodes, n_classes, depth = self.tree_shape
        head = FusedHead(TreeEnsemble(n_trees, n_nodes, n_classes, depth), latent_dim, n_classes)
        head.load_state_dict(self.state)
        return head.eval()

    @staticmethod
    def from_head(head: FusedHead, feature_names: tuple[str, ...], features_version: int,
                  config: dict[str, Any] | None = None, metrics: dict[str, Any] | None = None) -> HeadSpec:  # fmt: skip
        t = head.trees
        shape = (int(t.offset.shape[0]), int(t.feature.shape[0] // max(t.offset.shape[0], 1)), t.n_classes, t.depth)
        state = {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}
        return HeadSpec(tuple(feature_names), features_version, "none (raw float32, NaN = missing)", shape, state,
                        config or {}, metrics or {})  # fmt: skip

    def to_payload(self) -> dict[str, Any]:
        return {"feature_names": list(self.feature_names), "features_version": self.features_version,
                "feature_normalisation": self.feature_normalisation, "tree_shape": list(self.tree_shape),
                "state": self.state, "config": self.config, "metrics": self.metrics}  # fmt: skip

    @staticmethod
    def from_payload(d: dict[str, Any]) -> HeadSpec:
        n_trees, n_nodes, n_classes, depth = (int(v) for v in d["tree_shape"])
        return HeadSpec(tuple(str(n) for n in d["feature_names"]), int(d["features_version"]),
                        str(d["feature_normalisation"]), (n_trees, n_nodes, n_classes, depth), dict(d["state"]),
                        dict(d.get("config", {})), dict(d.get("metrics", {})))  # fmt: skip


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
    head: HeadSpec | None = None

    def build(self, device: torch.device | str = "cpu") -> StampClassifier:
        """The stamp part alone: encoder + the study's linear probe."""
        model = StampClassifier(self.model_config, self.class_names, self.tta_dihedral)
        model.encoder.load_state_dict(self.encoder_state)
        model.probe.load_state_dict(self.probe_state)
        return model.to(device).eval()

    def build_alert_model(self, device: torch.device | str = "cpu") -> AlertModel:
        """Encoder, stamp probe and (when the bundle has one) the fused head, in one module."""
        head = self.head.build(self.model_config.latent_dim) if self.head is not None else None
        return AlertModel(self.build("cpu"), head).to(device).eval()

    @property
    def feature_names(self) -> tuple[str, ...]:
        return self.head.feature_names if self.head is not None else ()

    @property
    def features_version(self) -> int:
        return self.head.features_version if self.head is not None else 0

    @property
    def has_head(self) -> bool:
        """Whether the classes come from the fused head (else from the stamp probe); the runtime
        bundle (model/runtime.py) answers the same three questions."""
        return self.head is not None


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
    head: HeadSpec | None = None,
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
        head=head,
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
        "head": None if bundle.head is None else bundle.head.to_payload(),
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
    if not isinstance(payload, dict) or payload.get("format") not in READABLE_FORMATS:
        raise BundleError(f"{path} is not a stampstream bundle of a readable format {READABLE_FORMATS}")
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
            head=HeadSpec.from_payload(payload["head"]) if payload.get("head") else None,
        )
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{path}: malformed bundle: {e}") from e
    if bundle.normalisation.get("method") != NORMALISATION["method"]:
        raise BundleError(f"{path}: normalisation {bundle.normalisation} is not supported by this code")
    try:
        model = bundle.build_alert_model("cpu")
        with torch.no_grad():
            z, ps, p = model(torch.zeros(1, 2, 21, 21), torch.full((1, len(bundle.feature_names)), float("nan")))
    except Exception as e:
        raise BundleError(f"{path}: weights do not fit the model config: {e}") from e
    n = len(bundle.class_names)
    if z.shape[1] != bundle.model_config.latent_dim or ps.shape[1] != n or p.shape[1] != n:
        raise BundleError(f"{path}: output shapes {tuple(z.shape)}, {tuple(p.shape)} do not fit the config")
    return bundle


def seed_bundle(
    latent_dim: int = 42, seed: int = 0, feature_names: tuple[str, ...] = (), features_version: int = 1
) -> Bundle:
    """The untrained seed architecture (random weights): for tests and a first run without a trained
    model. With ``feature_names``, a fused head of one random stump per class reading them."""
    torch.manual_seed(seed)
    model = StampClassifier(AutoencoderConfig(latent_dim=latent_dim), CLASS_NAMES, False)
    head = None
    if feature_names:
        n_classes, n_features = len(CLASS_NAMES), len(feature_names)
        trees = TreeEnsemble(n_classes, 3, n_classes, 1)
        with torch.no_grad():
            for t in range(n_classes):
                root = 3 * t
                trees.feature[root] = t % n_features
                trees.left[root], trees.right[root] = 1, 2
                trees.is_leaf[root] = False
                trees.value[root + 1 : root + 3] = torch.randn(2)
            trees.to_class.copy_(torch.eye(n_classes))
        fused = FusedHead(trees, latent_dim, n_classes)
        with torch.no_grad():
            fused.fusion.weight.normal_(0, 0.1)
        head = HeadSpec.from_head(fused, feature_names, features_version)
    return bundle_from_model(model, name="seed-untrained", version="0", training_data={"alerts": 0}, head=head)
