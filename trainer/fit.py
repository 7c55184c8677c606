"""`trainer fit`: the autoencoder on all alerts of the training objects (labels not needed), early
stopping on the validation objects, then the linear probe on the frozen encoder with the labels,
then the evaluation on the test objects. Checkpoints every epoch; a rerun resumes.

With ``encoder_from`` (``trainer fit --encoder BUNDLE``) the encoder is a bundle's, taken as it is,
and only the probe and the classifier are fitted. Why: the embedding is published (the output
topic's ``embedding``, the similarity index in Redis, whatever subscribers stored), and training
the autoencoder again changes every z (on another CPU not even bit-identical) when new labels only
ask for new classes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from alerts.features import FEATURE_NAMES, FEATURES_VERSION
from config import TrainerConfig
from model.autoencoder import Autoencoder, Encoder, autoencoder_loss
from model.bundle import HeadSpec, load_bundle
from model.classifier import LinearProbe, embed_stamps
from model.device import select_device
from trainer import run_folder as rf
from trainer.augment import augment, random_dihedral, random_shift
from trainer.comparison import summarise, train_head
from trainer.data import Dataset, Splits, split_by_object
from trainer.evaluation import classification_metrics, knn_metrics, raw_pixel_baseline
from trainer.unlabelled import unlabelled_calls, unlabelled_of_other_objects

log = logging.getLogger("stampstream.trainer")


EVAL_VERSION = 2  # bump when the evaluation changes: the sweep re-evaluates older runs from model.pt


@dataclass
class TrainState:
    epoch: int = 0
    best_val: float = float("inf")
    best_epoch: int = -1
    bad_epochs: int = 0
    history: list[dict[str, float]] = dataclasses.field(default_factory=list)


def _batches(n: int, bs: int, gen: torch.Generator) -> list[torch.Tensor]:
    perm = torch.randperm(n, generator=gen)
    return [perm[i : i + bs] for i in range(0, n, bs)]


@torch.no_grad()
def reconstruction_mse(model: Autoencoder, x: torch.Tensor, device: torch.device, bs: int = 1000) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(x), bs):
        xb = x[i : i + bs].to(device)
        recon, _, _ = model(xb)
        total += float(((recon.float() - xb) ** 2).mean()) * len(xb)
    return total / max(len(x), 1)


@torch.no_grad()
def embed(encoder: Encoder, x: torch.Tensor, device: torch.device, tta: bool, bs: int = 1000) -> np.ndarray:
    encoder.eval()
    out = [embed_stamps(encoder, x[i : i + bs].to(device), tta).float().cpu() for i in range(0, len(x), bs)]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def view_loss(z1: torch.Tensor, z2: torch.Tensor, kind: str, temperature: float = 0.2) -> torch.Tensor:
    """invariance: mean squared distance between the two views' z (reconstruction keeps z from
    collapsing). contrastive: NT-Xent (SimCLR), each stamp's other view against the batch."""
    if kind == "invariance":
        return torch.mean((z1 - z2) ** 2)
    a = torch.nn.functional.normalize(z1, dim=1)
    b = torch.nn.functional.normalize(z2, dim=1)
    logits = a @ b.T / temperature
    target = torch.arange(len(a), device=a.device)
    return 0.5 * (torch.nn.functional.cross_entropy(logits, target) + torch.nn.functional.cross_entropy(logits.T, target))


class ProjectionHead(torch.nn.Module):
    """SimCLR's projection for the contrastive loss (z -> 128 -> dim), training only: the bundle
    ships the encoder without it. Measured on the ZTF corpus (docs/gpu/2026-11-26-h100.md) it
    lowers the stamp probe (43-47 % against 50-53 %): the contrastive term then shapes the
    projection, not z, so the default (``projection_dim: 0``) keeps the loss on z."""

    def __init__(self, latent: int, dim: int, hidden: int = 128) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(latent, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, dim))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(z)
        return out


def train_autoencoder(
    cfg: TrainerConfig,
    x_train: torch.Tensor,
    x_val: torch.Tensor,
    run_dir: Path,
    device: torch.device,
    max_steps: int | None = None,
    show_progress: bool = True,
) -> tuple[Autoencoder, TrainState]:
    torch.manual_seed(cfg.seed)
    model = Autoencoder(cfg.autoencoder).to(device)
    projection = (
        ProjectionHead(cfg.autoencoder.latent_dim, cfg.projection_dim).to(device)
        if cfg.extra_objective == "contrastive" and cfg.projection_dim > 0
        else None
    )
    params = [*model.parameters(), *(projection.parameters() if projection is not None else ())]
    opt = torch.optim.Adam(params, lr=cfg.lr)
    state = TrainState()
    ckpt_path = rf.checkpoint_path(run_dir)
    best_state: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if ckpt_path.exists():
        # weights_only: a checkpoint holds tensors and plain values, so loading one never runs
        # code from the file (a run folder may come from elsewhere).
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        if projection is not None:
            projection.load_state_dict(ckpt["projection"])
        opt.load_state_dict(ckpt["optimizer"])
        best_state = ckpt["best_model"]
        state = TrainState(**ckpt["state"])
        log.info("resuming from epoch %d (best val %.5f at %d)", state.epoch, state.best_val, state.best_epoch)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + state.epoch)
    amp = device.type == "cuda"
    x_train_dev = x_train.to(device)
    steps = 0
    bar = tqdm(range(state.epoch, cfg.max_epochs), desc="autoencoder", unit="epoch", disable=not show_progress)
    for epoch in bar:
        if state.bad_epochs >= cfg.patience:
            break
        model.train()
        t0, n_seen = time.perf_counter(), 0
        total = torch.zeros((), device=device)
        total_mse = torch.zeros((), device=device)  # two tensors: += below is in place
        for idx in _batches(len(x_train_dev), cfg.batch_size, gen):
            xb = augment(x_train_dev[idx.to(device)], cfg.augment, cfg.tile_grid, gen)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                recon, mu, logvar = model(xb)
            loss, mse = autoencoder_loss(xb, recon.float(), mu.float(), None if logvar is None else logvar.float(), cfg.kl_weight)
            if cfg.extra_objective != "none":
                # a second view of each stamp: another flip/rotation plus a little pixel noise
                view = random_shift(random_dihedral(xb, gen), cfg.view_shift, gen)
                view = view + 0.02 * torch.randn(view.shape, generator=gen).to(device)
                with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                    mu2, _ = model.encoder(view)
                z1, z2 = mu.float(), mu2.float()
                if projection is not None:
                    z1, z2 = projection(z1), projection(z2)
                loss = loss + cfg.extra_weight * view_loss(z1, z2, cfg.extra_objective, cfg.contrastive_temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # type: ignore[no-untyped-call]
            opt.step()
            total += loss.detach() * len(idx)
            total_mse += mse.detach() * len(idx)
            n_seen += len(idx)
            steps += 1
            if max_steps is not None and steps >= max_steps:
                break
        val_mse = reconstruction_mse(model, x_val, device)
        row = {
            "epoch": epoch,
            "train_loss": float(total) / max(n_seen, 1),
            "train_mse": float(total_mse) / max(n_seen, 1),
            "val_mse": val_mse,
            "seconds": time.perf_counter() - t0,
        }
        state.history.append(row)
        if val_mse < state.best_val - 1e-7:
            state.best_val, state.best_epoch, state.bad_epochs = val_mse, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state.bad_epochs += 1
        state.epoch = epoch + 1
        torch.save(
            {"model": model.state_dict(), "optimizer": opt.state_dict(), "best_model": best_state,
             "state": dataclasses.asdict(state),
             **({"projection": projection.state_dict()} if projection is not None else {})},
            ckpt_path,
        )  # fmt: skip
        bar.set_postfix(train=f"{row['train_mse']:.5f}", val=f"{val_mse:.5f}", best=state.best_epoch)
        if max_steps is not None and steps >= max_steps:
            break
    model.load_state_dict(best_state)
    return model.eval(), state


def fit_probe(
    z_fit: np.ndarray, y_fit: np.ndarray, n_classes: int, l2: float, iterations: int, device: torch.device
) -> LinearProbe:
    """Class-balanced logistic regression on standardised z (macro F1 is the target), full batch,
    L-BFGS to convergence: a probe measures the embedding, so it must not be under-trained."""
    z = torch.from_numpy(z_fit).float().to(device)
    y = torch.from_numpy(y_fit).long().to(device)
    probe = LinearProbe(z.shape[1], n_classes).to(device)
    probe.z_mean.copy_(z.mean(0))
    probe.z_std.copy_(z.std(0).clamp_min(1e-6))
    torch.nn.init.zeros_(probe.linear.weight)
    torch.nn.init.zeros_(probe.linear.bias)
    counts = torch.bincount(y, minlength=n_classes).float()
    weight = torch.where(counts > 0, counts.sum() / (n_classes * counts.clamp_min(1)), torch.zeros_like(counts))
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    opt = torch.optim.LBFGS(probe.linear.parameters(), lr=1.0, max_iter=iterations, history_size=20,
                            line_search_fn="strong_wolfe", tolerance_grad=1e-6)  # fmt: skip

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        loss: torch.Tensor = loss_fn(probe(z), y) + l2 * probe.linear.weight.pow(2).sum()
        loss.backward()  # type: ignore[no-untyped-call]
        return loss

    opt.step(closure)  # type: ignore[no-untyped-call]
    return probe.eval()


def select_and_fit_probe(
    z: np.ndarray, y: np.ndarray, lab_tr: np.ndarray, lab_va: np.ndarray, n_classes: int, cfg: TrainerConfig,
    device: torch.device,
) -> tuple[LinearProbe, float]:
    """The L2 penalty that gives the best macro F1 on the validation objects, then a refit on
    train + validation with it."""
    from sklearn.metrics import f1_score

    best_l2, best_f1 = cfg.probe_l2_grid[0], -1.0
    if len(lab_va) and len(cfg.probe_l2_grid) > 1:
        for l2 in cfg.probe_l2_grid:
            probe = fit_probe(z[lab_tr], y[lab_tr], n_classes, l2, cfg.probe_epochs, device)
            with torch.no_grad():
                pred = probe(torch.from_numpy(z[lab_va]).to(device)).argmax(1).cpu().numpy()
            f1 = f1_score(y[lab_va], pred, average="macro")
            if f1 > best_f1:
                best_l2, best_f1 = l2, f1
    both = np.concatenate([lab_tr, lab_va])
    return fit_probe(z[both], y[both], n_classes, best_l2, cfg.probe_epochs, device), best_l2


def run_fit(
    cfg: TrainerConfig,
    ds: Dataset,
    run_dir: Path,
    *,
    data_paths: list[str] | None = None,
    smoke: bool = False,
    show_progress: bool = True,
    baseline: bool = True,
    encoder_from: Path | None = None,
) -> dict[str, Any]:
    """Train, probe, evaluate; writes model.pt, metrics.json, history.json, embeddings.npz, split.json.
    ``encoder_from``: a bundle whose encoder is used as it is instead of training one."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    device = select_device(cfg.device)
    source = None
    if encoder_from is not None:
        model, source = encoder_of_bundle(encoder_from)
        cfg = dataclasses.replace(cfg, autoencoder=model.cfg)  # the run folder records the architecture it has
    splits: Splits = split_by_object(ds, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    rf.save_config(run_dir, rf.RunConfig(cfg, list(data_paths or []), smoke))
    rf.save_split(run_dir, {k: ds.candid[getattr(splits, k)].tolist() for k in ("train", "val", "test")})
    x = torch.from_numpy(ds.x)
    t0 = time.perf_counter()
    if source is None:
        model, state = train_autoencoder(
            cfg, x[splits.train], x[splits.val], run_dir, device, max_steps=20 if smoke else None,
            show_progress=show_progress,
        )  # fmt: skip
    else:
        model, state = model.to(device), TrainState(epoch=0, best_val=float("nan"), best_epoch=-1)
    # training time of every epoch, those of an earlier, resumed process included
    train_s = max(time.perf_counter() - t0, sum(h.get("seconds", 0.0) for h in state.history))
    rf.save_history(run_dir, state.history)
    metrics = evaluate_run(run_dir, model, state, train_s, ds, splits, cfg, device, baseline, encoder_source=source)
    metrics["classifier"] = classifier_stage(run_dir, ds, model.encoder, cfg.head.embedding == "pooled", cfg, device,
                                             quick=smoke, show_progress=show_progress)  # fmt: skip
    rf.save_metrics(run_dir, metrics)
    return metrics


def encoder_of_bundle(path: Path) -> tuple[Autoencoder, dict[str, Any]]:
    """A bundle's encoder, weight for weight, inside an autoencoder of its architecture, and where it
    came from (recorded in the run's metrics and, through ``trainer export``, in the new bundle).
    The bundle holds no decoder: the decoder stays at its initialisation and is never used, since
    a run with a borrowed encoder reports no reconstruction."""
    bundle = load_bundle(path)
    model = Autoencoder(bundle.model_config)
    model.encoder.load_state_dict(bundle.encoder_state)
    digest = hashlib.sha256(b"".join(t.numpy().tobytes() for _, t in sorted(bundle.encoder_state.items()))).hexdigest()
    source = {"bundle": bundle.name, "version": bundle.version, "path": str(path), "encoder_sha256": digest}
    return model.eval(), source


def classifier_stage(
    run_dir: Path, ds: Dataset, encoder: Encoder, tta: bool, cfg: TrainerConfig, device: torch.device,
    *, quick: bool, show_progress: bool,
) -> dict[str, Any]:
    """The fused classifier on the labelled alerts (features + the stamp embedding): the
    cross-validated comparison table, then the head the bundle ships (run folder: head.pt,
    classifier.json). Skipped (with a warning) with fewer than three labelled classes."""
    lab = np.flatnonzero(ds.y >= 0)
    if len(np.unique(ds.y[lab])) < 3:
        log.warning("fewer than three labelled classes: no fused classifier")
        return {}
    z = embed(encoder, torch.from_numpy(ds.x), device, tta)
    fitted, table = train_head(ds.features[lab], z[lab], ds.y[lab], ds.object_id[lab], ds.class_names, cfg.head,
                               sequences=ds.sequences[lab], quick=quick, show_progress=show_progress,
                               stamps=None if tta else ds.x[lab], encoder=encoder.cpu(), stages=ds.stages[:, lab],
                               earliest=ds.earliest[lab], exported=ds.exported[:, lab])  # fmt: skip
    encoder.to(device)
    others = unlabelled_of_other_objects(ds.y, ds.object_id)
    if others.any():
        table["unlabelled"] = unlabelled_calls(fitted.predict_proba(ds.features[others], z[others]),
                                               ds.features[others], ds.class_names)  # fmt: skip
    summary = summarise(table, ds.class_names)
    spec = HeadSpec.from_head(fitted.head(), FEATURE_NAMES, FEATURES_VERSION, config=dataclasses.asdict(cfg.head), metrics=summary)
    rf.save_head(run_dir, spec, table)
    return summary


def reevaluate_run(run_dir: Path, ds: Dataset, cfg: TrainerConfig, baseline: bool = True) -> dict[str, Any]:
    """Evaluate a trained run again (new evaluation code) from its weights, without retraining."""
    device = select_device(cfg.device)
    old = rf.load_metrics(run_dir)
    saved = rf.load_weights(run_dir, device)
    model = Autoencoder(saved.model_config).to(device)
    model.load_state_dict(saved.autoencoder)
    state = TrainState(epoch=old["epochs_run"], best_val=old["val_mse"], best_epoch=old["best_epoch"])
    splits = split_by_object(ds, cfg.val_fraction, cfg.test_fraction, cfg.seed)
    return evaluate_run(run_dir, model.eval(), state, old["train_seconds"], ds, splits, cfg, device, baseline,
                        encoder_source=old.get("encoder_from"))  # fmt: skip


def evaluate_run(
    run_dir: Path, model: Autoencoder, state: TrainState, train_s: float, ds: Dataset, splits: Splits,
    cfg: TrainerConfig, device: torch.device, baseline: bool, encoder_source: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Probe, kNN and reconstruction scores on the test objects; writes model.pt, embeddings, metrics.
    With a borrowed encoder (``encoder_source``) there is no trained decoder: no reconstruction
    scores (None), and the metrics name the bundle the encoder came from."""
    x = torch.from_numpy(ds.x)
    lab_tr = splits.train[ds.y[splits.train] >= 0]
    lab_va = splits.val[ds.y[splits.val] >= 0]
    lab_te = splits.test[ds.y[splits.test] >= 0]
    # The probe's L2 is chosen on val's labels, then it is refitted on train+val labelled alerts.
    lab_fit = np.concatenate([lab_tr, lab_va])
    n_classes = len(ds.class_names)
    # Probe on the plain embedding (the study) and on the embedding averaged over the 8
    # flips/rotations (rotation-invariant pooling); the bundle keeps the better of the two.
    variants: dict[bool, dict[str, Any]] = {}
    for tta in (False, True):
        z_all = embed(model.encoder, x, device, tta)
        probe, l2 = select_and_fit_probe(z_all, ds.y, lab_tr, lab_va, n_classes, cfg, device)
        with torch.no_grad():
            logits = probe(torch.from_numpy(z_all[lab_te]).to(device)).float().cpu()
        pred = logits.argmax(1).numpy()
        variants[tta] = {
            "z": z_all, "probe": probe, "pred": pred, "probs": torch.softmax(logits, 1).numpy(), "l2": l2,
            "probe_metrics": classification_metrics(ds.y[lab_te], pred, ds.class_names),
            "knn": knn_metrics(z_all[lab_fit], ds.y[lab_fit], z_all[lab_te], ds.y[lab_te], ds.class_names),
        }  # fmt: skip
    use_tta = variants[True]["probe_metrics"]["macro_f1"] > variants[False]["probe_metrics"]["macro_f1"]
    best = variants[use_tta]
    metrics: dict[str, Any] = {
        "probe": variants[False]["probe_metrics"],
        "knn": variants[False]["knn"],
        "probe_tta": variants[True]["probe_metrics"],
        "knn_tta": variants[True]["knn"],
        "tta_dihedral": use_tta,
        "probe_l2": {"plain": variants[False]["l2"], "pooled": variants[True]["l2"]},
        "eval_version": EVAL_VERSION,
        "test_mse": reconstruction_mse(model, x[splits.test], device) if encoder_source is None else None,
        "val_mse": state.best_val if encoder_source is None else None,
        "best_epoch": state.best_epoch,
        "epochs_run": state.epoch,
        "train_seconds": train_s,
        "device": device.type,
        "splits": {
            "train_alerts": len(splits.train), "val_alerts": len(splits.val), "test_alerts": len(splits.test),
            "labelled_fit": len(lab_fit), "labelled_test": len(lab_te),
        },
        "data": ds.summary(),
        "leakage_guard": "the stamp network reads the science and difference stamps only; the fused "
        "classifier reads the allowlisted features of alerts/allowlist.py, never ssdistnr, ssmagnr, ssnamenr, "
        "rb, drb, drbversion or anything computed from them",
    }  # fmt: skip
    if encoder_source is not None:
        metrics["encoder_from"] = encoder_source
    if baseline:
        metrics["raw_pixels_logreg"] = raw_pixel_baseline(ds.x, ds.y, lab_tr, lab_va, lab_te, ds.class_names, cfg.seed)
    # A few test stamps (one per class where possible) for the report's reconstruction figure.
    pick = [int(lab_te[ds.y[lab_te] == c][0]) for c in range(n_classes) if (ds.y[lab_te] == c).any()]
    pick += [int(i) for i in splits.test if int(i) not in pick][: max(0, 8 - len(pick))]
    rf.save_weights(run_dir, rf.RunWeights(
        model.cfg, model.state_dict(), best["probe"].state_dict(), variants[False]["probe"].state_dict(),
        variants[True]["probe"].state_dict(), use_tta, tuple(ds.class_names),
    ))  # fmt: skip
    rf.save_embeddings(run_dir, rf.RunEmbeddings(
        z=best["z"], y=ds.y, candid=ds.candid, test_idx=lab_te, fit_idx=lab_fit, test_pred=best["pred"],
        test_probs=best["probs"], test_all_idx=splits.test,
    ))  # fmt: skip
    rf.save_examples(run_dir, rf.RunExamples(ds.x[pick], ds.y[pick], ds.candid[pick]))
    rf.save_metrics(run_dir, metrics)  # last: marks the run finished
    return metrics
