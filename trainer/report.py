"""`trainer report RUN_DIR`: report.md with PNGs a person can look at: the classifier comparison
table (cross-validated), per-class scores, confusion matrices, the reliability diagram of the
fused classifier, training curves, UMAP of the latent space coloured by class, reconstructions, and
clusters of the latent space (trainer/clusters.py) with a mosaic of member stamps per cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from model.autoencoder import Autoencoder  # noqa: E402
from trainer import run_folder as rf  # noqa: E402

COLOURS = {"AGN": "tab:purple", "SN": "tab:red", "VS": "tab:green", "asteroid": "tab:orange", "bogus": "tab:gray"}


def _curves(history: list[dict[str, float]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 4))
    ep = [h["epoch"] for h in history]
    ax.plot(ep, [h["train_mse"] for h in history], label="train MSE (augmented)")
    ax.plot(ep, [h["val_mse"] for h in history], label="validation MSE")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction MSE")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _confusion(cm: list[list[int]], names: list[str], out: Path) -> None:
    a = np.asarray(cm, dtype=float)
    norm = a / np.maximum(a.sum(1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(5, 4.4))
    im = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{int(a[i, j])}", ha="center", va="center", color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xticks(range(len(names)), names, rotation=30)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.colorbar(im, ax=ax, label="fraction of true class")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _projection(z: np.ndarray) -> tuple[np.ndarray, str]:
    """2-D view of the latent space: UMAP, or PCA where UMAP is missing or fails."""
    try:
        import umap

        return np.asarray(umap.UMAP(n_neighbors=15, min_dist=0.1, random_state=0).fit_transform(z)), "UMAP"
    except Exception:  # umap/numba missing or failing: a PCA view is better than none
        zc = z - z.mean(0)
        return zc @ np.linalg.svd(zc, full_matrices=False)[2][:2].T, "PCA (UMAP unavailable)"


def _umap(xy: np.ndarray, method: str, y: np.ndarray, names: list[str], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 5))
    lab = y < 0
    ax.scatter(xy[lab, 0], xy[lab, 1], s=3, c="lightgray", label="unlabelled")
    for i, n in enumerate(names):
        m = y == i
        ax.scatter(xy[m, 0], xy[m, 1], s=8, c=COLOURS.get(n), label=n)
    ax.legend(markerscale=2, fontsize=8)
    ax.set_title(f"{method} of the latent space (all alerts)")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _reconstructions(run: rf.Run, names: list[str], out: Path) -> None:
    model = Autoencoder(run.weights.model_config)
    model.load_state_dict(run.weights.autoencoder)
    model.eval()
    ex = run.examples
    x = torch.from_numpy(ex.x)
    with torch.no_grad():
        recon = model(x)[0].numpy()
    n = len(x)
    fig, axes = plt.subplots(4, n, figsize=(1.4 * n, 6))
    rows = [("science", 0, False), ("science recon", 0, True), ("difference", 1, False), ("difference recon", 1, True)]
    for j in range(n):
        for i, (title, ch, rec) in enumerate(rows):
            ax = axes[i, j] if n > 1 else axes[i]
            ax.imshow((recon if rec else ex.x)[j, ch], cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(title, fontsize=7)
        label = names[int(ex.y[j])] if ex.y[j] >= 0 else "unlabelled"
        (axes[0, j] if n > 1 else axes[0]).set_title(label, fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _reliability(bins: list[dict[str, Any]], ece: float, out: Path) -> None:
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    conf = [b["confidence"] for b in bins]
    acc = [b["accuracy"] for b in bins]
    ax.plot(conf, acc, "o-", color="tab:blue", label=f"fused classifier (ECE {100 * ece:.1f} %)")
    for b in bins:
        ax.annotate(str(b["n"]), (b["confidence"], b["accuracy"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    ax.set_xlabel("predicted probability of the top class")
    ax.set_ylabel("fraction correct")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=8, loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _stages_figure(summary: dict[str, Any], names: list[str], out: Path) -> None:
    """F1 of the fused classifier per class, and macro-F1 of the fused, its own trees' and the
    reference rows, against the number of detections the object has had (the last point: the
    alerts as they are)."""
    from trainer.comparison import FUSED_ROW, GATED_ROW, REFERENCE_ROW

    fused = summary["rows"][FUSED_ROW]
    ticks = [str(s["detections"]) for s in fused["stages"]] + ["as labelled"]
    x = np.arange(len(ticks))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for n in names:
        ax.plot(x, [100 * s["per_class_f1"][n] for s in fused["stages"]] + [100 * fused["per_class_f1"][n]],
                "o-", lw=1.2, ms=4, label=n)  # fmt: skip
    for row, style, label in ((FUSED_ROW, "k-", "macro, fused"), (GATED_ROW, "k:", "macro, the fused model's trees (no z)"),
                              (REFERENCE_ROW, "k--", "macro, reference trees")):  # fmt: skip
        r = summary["rows"].get(row)
        if r and "stages" in r:
            ax.plot(x, [100 * s["macro_f1_mean"] for s in r["stages"]] + [100 * r["macro_f1_mean"]], style, lw=2.2, label=label)
    ax.set_xticks(x, ticks)
    ax.set_xlabel("detections of the object so far (earlier views of the labelled alerts)")
    ax.set_ylabel("F1 %")
    ax.set_ylim(0, 101)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _stages_section(summary: dict[str, Any], names: list[str], run_dir: Path) -> list[str]:
    from trainer.comparison import FUSED_ROW, GATED_ROW, REFERENCE_ROW

    fused = summary["rows"].get(FUSED_ROW, {})
    others = [summary["rows"].get(name, {}) for name in (GATED_ROW, REFERENCE_ROW)]
    if "stages" not in fused:
        return []
    _stages_figure(summary, names, run_dir / "stages.png")
    lines = [
        "### By detections so far",
        "",
        "The labelled SN, AGN and VS alerts come from objects detected many times, its asteroids and bogus alerts "
        "are first detections: the same folds, scored on each test alert as it would have looked when its object "
        "had been detected only k times (trainer/stages.py: earlier detections of the history become upper "
        "limits, ndethist = k; at k = 1 the view takes the measurements of the earliest detection of the window, "
        "where there is one; an alert of an object with at most k detections is unchanged). The reference trees "
        "are fitted on the alerts as they are; the fused model scores an alert with at most head.early_detections "
        "detections in its own 30-day history with trees of its own (not an alert that carries no history at all "
        "and whose ndethist is above head.known_object_ndethist: its object is not new), fitted on the training "
        "folds' alerts the gate picks, on the earlier views of the others and on their earliest detections as "
        "alerts of their own time (0: one set of trees).",
        "",
        "| detections so far | fused macro F1 % | its trees (no z) macro F1 % | reference trees macro F1 % | "
        + " | ".join(f"{n} F1 %" for n in names) + " |",
        "|---|---|---|---|" + "---|" * len(names),
    ]

    def cell(r: dict[str, Any] | None) -> str:
        return f"{100 * r['macro_f1_mean']:.1f} ± {100 * r['macro_f1_std']:.1f}" if r else ""

    columns = [[*o.get("stages", [None] * len(fused["stages"])), o or None] for o in others]
    for i, s in enumerate([*fused["stages"], {"detections": "as labelled"} | fused]):
        per = " | ".join(f"{100 * s['per_class_f1'][n]:.1f}" for n in names)
        lines.append(f"| {s['detections']} | {cell(s)} | {cell(columns[0][i])} | {cell(columns[1][i])} | {per} |")
    lines += ["", "![F1 by detections so far](stages.png)", ""]
    return lines


def _unlabelled_figure(calls: dict[str, Any], names: list[str], out: Path) -> None:
    """One bar per group of trainer/unlabelled.py: the share of its alerts the head calls each class."""
    groups = [g for g in calls["groups"] if g["alerts"]]
    fig, ax = plt.subplots(figsize=(7.5, 1.6 + 0.55 * len(groups)))
    left = np.zeros(len(groups))
    for i, n in enumerate(names):
        share = np.array([100 * g["called"][n] / g["alerts"] for g in groups])
        ax.barh(range(len(groups)), share, left=left, color=plt.get_cmap("tab10")(i), label=n)
        left += share
    ax.set_yticks(range(len(groups)), [f"{g['short']} ({g['alerts']})" for g in groups], fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of the group's alerts called each class")
    ax.legend(fontsize=7, ncol=len(names), loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _unlabelled_section(table: dict[str, Any], names: list[str], run_dir: Path) -> list[str]:
    calls = table.get("unlabelled")
    if not calls or not calls["alerts"]:
        return []
    _unlabelled_figure(calls, names, run_dir / "unlabelled.png")
    lines = [
        "### What it calls the alerts nobody labelled",
        "",
        f"The shipped head on the {calls['alerts']} unlabelled alerts of objects without a label (objects it was "
        "never trained on; trainer/unlabelled.py). No class to score against, but the labelled set has no real first "
        "detection of a new object, and these alerts have: the share of each class it calls there is what a "
        "subscriber will see.",
        "",
        "| alerts | n | " + " | ".join(f"{n} %" for n in names) + " | mean top probability |",
        "|---|---|" + "---|" * len(names) + "---|",
    ]
    for g in calls["groups"]:
        share = " | ".join(f"{100 * g['called'][n] / g['alerts']:.0f}" if g["alerts"] else "" for n in names)
        top = f"{g['mean_top_probability']:.2f}" if g["mean_top_probability"] is not None else ""
        lines.append(f"| {g['group']} | {g['alerts']} | {share} | {top} |")
    return [*lines, "", "![what it calls the unlabelled alerts](unlabelled.png)", ""]


def _classifier_section(run_dir: Path, names: list[str]) -> list[str]:
    """The cross-validated comparison table, per-class F1, the fused model's confusion matrix and
    reliability diagram (out-of-fold predictions of seed 0), and the scores by detections so far."""
    from sklearn.metrics import confusion_matrix

    from trainer.comparison import FUSED_ROW, STUDY_ROW, summarise

    table = rf.load_classifier_table(run_dir)
    if not table:
        return []
    summary = summarise(table, names)
    lines = [
        "## Classifier: stamps + alert metadata + 30-day history",
        "",
        f"Object-grouped {table['folds']}-fold cross-validation over {table['seeds']} seed(s), {table['labelled']} "
        f"labelled alerts of {table['objects']} objects; macro-F1 % as mean ± std over seeds. The first row is the "
        "study's method; the last one is the model the bundle ships.",
        "",
        "| model | macro F1 % | " + " | ".join(f"{n} F1 %" for n in names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for name, r in summary["rows"].items():
        bold = "**" if name in (FUSED_ROW, STUDY_ROW) else ""
        per = " | ".join(f"{100 * r['per_class_f1'][n]:.1f}" for n in names)
        lines.append(f"| {bold}{name}{bold} | {100 * r['macro_f1_mean']:.1f} ± {100 * r['macro_f1_std']:.1f} | {per} |")
    fused = table["rows"].get(FUSED_ROW)
    if fused:
        probs = np.asarray(fused["oof_probabilities_seed0"])
        y = np.asarray(rf.load_embeddings(run_dir).y)
        y = y[y >= 0]
        cm = confusion_matrix(y, probs.argmax(1), labels=list(range(len(names)))).tolist()
        _confusion(cm, names, run_dir / "confusion_fused.png")
        cal = fused["calibration"]
        _reliability(cal["bins"], cal["ece"], run_dir / "reliability.png")
        lines += [
            "",
            f"Calibration of the fused classifier (temperature-scaled): expected calibration error "
            f"**{100 * cal['ece']:.1f} %** (out-of-fold, seed 0).",
            "",
            "Confusion matrix of the fused classifier (out-of-fold): ![confusion fused](confusion_fused.png)",
            "",
            "Reliability diagram: ![reliability](reliability.png)",
            "",
        ]
    return lines + _stages_section(summary, names, run_dir) + _unlabelled_section(table, names, run_dir)


def _stamps_of(run: rf.Run, candids: np.ndarray) -> dict[int, np.ndarray] | None:
    """Normalised stamps of these alerts, read again from the run's data (None where it is gone)."""
    from trainer.data import load_dataset

    try:
        ds = load_dataset(run.config.data, {})
    except (OSError, ValueError):
        return None
    want = set(int(c) for c in candids)
    return {int(c): ds.x[i] for i, c in enumerate(ds.candid) if int(c) in want}


def _cluster_mosaic(stamps: dict[int, np.ndarray], rows: list[tuple[str, np.ndarray]], out: Path) -> None:
    """One row per cluster: its members closest to the cluster's centre, science over difference."""
    n = max(len(c) for _, c in rows)
    fig, axes = plt.subplots(2 * len(rows), n, figsize=(0.8 * n + 1.5, 1.6 * len(rows)), squeeze=False)
    for r, (title, cands) in enumerate(rows):
        for j in range(n):
            for ch in (0, 1):
                ax = axes[2 * r + ch, j]
                ax.set_xticks([])
                ax.set_yticks([])
                if j < len(cands) and int(cands[j]) in stamps:
                    ax.imshow(stamps[int(cands[j])][ch], cmap="viridis" if ch == 0 else "RdBu_r", vmin=0, vmax=1)
                else:
                    ax.axis("off")
            if j == 0:
                axes[2 * r, 0].set_ylabel(title, fontsize=6, rotation=0, ha="right", va="center")
    fig.tight_layout(h_pad=0.1, w_pad=0.1)
    fig.savefig(out, dpi=100)
    plt.close(fig)


def _clusters_section(run: rf.Run, run_dir: Path, xy: np.ndarray, method: str, names: list[str]) -> list[str]:
    """Clusters of the latent space, chosen by AMI against the labels (trainer/clusters.py)."""
    from trainer.clusters import NOISE, best, candidates, representatives

    emb = run.embeddings
    cands = candidates(emb.z, emb.y)
    if not cands:
        return []
    chosen = best(cands)
    lines = [
        "## Clusters of the latent space",
        "",
        "Candidates on the L2-normalised z, scored against the labels of the labelled alerts: adjusted mutual "
        "information (AMI, corrected for chance and for the number of clusters), purity (labelled members in their "
        "cluster's majority class), coverage (labelled alerts not called noise), cosine silhouette. "
        f"Kept: **{chosen.method}** (highest AMI).",
        "",
        "| method | clusters | AMI | purity % | coverage % | silhouette |",
        "|---|---|---|---|---|---|",
    ]
    for c in cands:
        bold = "**" if c is chosen else ""
        lines.append(f"| {bold}{c.method}{bold} | {c.clusters} | {c.ami:.3f} | {100 * c.purity:.1f} | "
                     f"{100 * c.coverage:.1f} | {c.silhouette:.3f} |")  # fmt: skip
    labels = chosen.labels
    ids = [c for c in np.unique(labels) if c != NOISE]
    ids.sort(key=lambda c: -int((labels == c).sum()))
    lines += ["", "| cluster | alerts | labelled | majority class | purity % |", "|---|---|---|---|---|"]
    mosaic_rows: list[tuple[str, np.ndarray]] = []
    for c in ids:
        m = labels == c
        lab = emb.y[m][emb.y[m] >= 0]
        major = names[int(np.bincount(lab).argmax())] if len(lab) else "-"
        pur = f"{100 * np.bincount(lab).max() / len(lab):.0f}" if len(lab) else "-"
        lines.append(f"| {c} | {int(m.sum())} | {len(lab)} | {major} | {pur} |")
        if len(mosaic_rows) < 16:
            mosaic_rows.append((f"#{c} n={int(m.sum())}\n{major} {pur}%", emb.candid[representatives(emb.z, labels, c, 8)]))
    fig, ax = plt.subplots(figsize=(6, 5))
    cmap = plt.get_cmap("tab20")
    for i, c in enumerate(ids):
        m = labels == c
        ax.scatter(xy[m, 0], xy[m, 1], s=3, color=cmap(i % 20))
    ax.scatter(xy[labels == NOISE, 0], xy[labels == NOISE, 1], s=2, c="lightgray")
    ax.set_title(f"{chosen.method} on {method}")
    ax.set_xticks([])
    ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(run_dir / "latent_clusters.png", dpi=110)
    plt.close(fig)
    lines += ["", f"Clusters on the {method} view: ![clusters](latent_clusters.png)", ""]
    stamps = _stamps_of(run, np.concatenate([c for _, c in mosaic_rows]))
    if stamps:
        _cluster_mosaic(stamps, mosaic_rows, run_dir / "cluster_mosaics.png")
        lines += ["Members nearest each cluster's centre (16 largest clusters; per cluster: science row over "
                  "difference row): ![mosaics](cluster_mosaics.png)", ""]  # fmt: skip
    else:
        lines += ["(No mosaics: the run's data is not readable here.)", ""]
    return lines


def _class_table(m: dict[str, Any]) -> list[str]:
    lines = ["| class | precision % | recall % | F1 % | test alerts |", "|---|---|---|---|---|"]
    for name, s in m["per_class"].items():
        lines.append(f"| {name} | {100 * s['precision']:.1f} | {100 * s['recall']:.1f} | {100 * s['f1']:.1f} | {s['support']} |")
    lines.append(f"| **macro** | **{100 * m['macro_precision']:.1f}** | **{100 * m['macro_recall']:.1f}** | **{100 * m['macro_f1']:.1f}** | |")
    return lines


def write_report(run_dir: Path) -> Path:
    run = rf.load_run(run_dir)
    metrics, history, emb = run.metrics, run.history, run.embeddings
    use_tta = metrics["tta_dihedral"]
    probe = metrics["probe_tta" if use_tta else "probe"]
    names = probe["class_names"]
    borrowed = metrics.get("encoder_from")  # an encoder taken from a bundle: no training, no decoder
    if not borrowed:
        _curves(history, run_dir / "curves.png")
        _reconstructions(run, names, run_dir / "reconstructions.png")
    _confusion(probe["confusion_matrix"], names, run_dir / "confusion.png")
    xy, method = _projection(emb.z)
    _umap(xy, method, emb.y, names, run_dir / "latent_umap.png")
    raw = metrics.get("raw_pixels_logreg")
    t = run.config.trainer
    lines = [
        f"# Training report: {run_dir.name}",
        "",
        f"Model: {t.autoencoder.kind} latent {t.autoencoder.latent_dim}, channels {t.autoencoder.channels}, "
        + (
            "the encoder of bundle {bundle}:{version} as it is (not trained in this run; encoder SHA-256 "
            "{encoder_sha256:.16}...), device {device}.".format(**borrowed, device=metrics["device"]) if borrowed
            else f"augmentation {t.augment}, extra objective {t.extra_objective}, lr {t.lr}, batch {t.batch_size}, "
            f"{metrics['epochs_run']} epochs (best {metrics['best_epoch']}), device {metrics['device']}, "
            f"{metrics['train_seconds']:.0f} s."
        ),
        f"Embedding used by the probe: {'mean over the 8 flips/rotations' if use_tta else 'plain z'}"
        + (f"; the fused classifier (and so the exported bundle) reads the {t.head.embedding} z." if rf.load_head(run_dir) else "."),
        "",
        f"Data: {metrics['data']['alerts']} alerts of {metrics['data']['objects']} objects, "
        f"{metrics['data']['labelled']} labelled {metrics['data']['per_class']}. Splits by objectId: "
        f"{metrics['splits']}.",
        "",
        f"Label leakage guard: {metrics['leakage_guard']}.",
        "",
        *_classifier_section(run_dir, names),
        "## Stamp embedding: scores on the test objects",
        "",
        f"Reconstruction MSE (test): **{metrics['test_mse']:.5f}** (validation best {metrics['val_mse']:.5f})."
        if not borrowed else "Reconstruction: none (the encoder was borrowed from a bundle, which holds no decoder).",
        "",
        *_class_table(probe),
        "",
        "| embedding | probe macro F1 % | kNN (k=5) accuracy % | kNN macro F1 % |",
        "|---|---|---|---|",
        f"| plain z | {100 * metrics['probe']['macro_f1']:.1f} | {100 * metrics['knn']['accuracy']:.1f} | {100 * metrics['knn']['macro_f1']:.1f} |",
        f"| z pooled over 8 flips/rotations | {100 * metrics['probe_tta']['macro_f1']:.1f} | {100 * metrics['knn_tta']['accuracy']:.1f} | {100 * metrics['knn_tta']['macro_f1']:.1f} |",
    ]
    if raw:
        lines.append(
            f"| raw pixels (logistic regression) | {100 * raw['macro_f1']:.1f} | {100 * raw['knn']['accuracy']:.1f} | {100 * raw['knn']['macro_f1']:.1f} |"
        )
    lines += [
        "",
        "## Figures",
        "",
        *([] if borrowed else ["Training curves: ![curves](curves.png)", ""]),
        "Confusion matrix (counts; colour: fraction of the true class): ![confusion](confusion.png)",
        "",
        f"{method} of the latent space, coloured by class: ![latent](latent_umap.png)",
        "",
        *([] if borrowed else [
            "Reconstructions (rows: science, its reconstruction, difference, its reconstruction): ![recon](reconstructions.png)",
            "",
        ]),  # fmt: skip
        *_clusters_section(run, run_dir, xy, method, names),
    ]
    out = run_dir / "report.md"
    out.write_text("\n".join(lines))
    return out
