"""Scores of an embedding: the linear probe's precision/recall/F1 and confusion matrix, kNN on the
embedding, and the reference every embedding must beat: logistic regression on the raw pixels."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support
from sklearn.neighbors import KNeighborsClassifier
from sklearn.preprocessing import StandardScaler


def classification_metrics(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    labels = list(range(len(class_names)))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    present = s > 0
    return {
        "macro_precision": float(p[present].mean()) if present.any() else 0.0,
        "macro_recall": float(r[present].mean()) if present.any() else 0.0,
        "macro_f1": float(f[present].mean()) if present.any() else 0.0,
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "class_names": list(class_names),
    }


def knn_metrics(
    z_fit: np.ndarray, y_fit: np.ndarray, z_test: np.ndarray, y_test: np.ndarray, class_names: Sequence[str], k: int = 5
) -> dict[str, Any]:
    scaler = StandardScaler().fit(z_fit)
    knn = KNeighborsClassifier(n_neighbors=min(k, len(z_fit))).fit(scaler.transform(z_fit), y_fit)
    m = classification_metrics(y_test, knn.predict(scaler.transform(z_test)), class_names)
    return {"k": k, "accuracy": m["accuracy"], "macro_f1": m["macro_f1"]}


def raw_pixel_baseline(
    x: np.ndarray, y: np.ndarray, lab_tr: np.ndarray, lab_va: np.ndarray, lab_te: np.ndarray,
    class_names: Sequence[str], seed: int, c_grid: Sequence[float] = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0),
) -> dict[str, Any]:
    """Logistic regression on the 2x21x21 normalised pixels, class-balanced like the probe, its C
    chosen on the validation objects like the probe's L2: the reference an embedding must beat."""
    from sklearn.metrics import f1_score

    flat = x.reshape(len(x), -1)

    def fit(idx: np.ndarray, c: float) -> tuple[StandardScaler, LogisticRegression]:
        scaler = StandardScaler().fit(flat[idx])
        clf = LogisticRegression(max_iter=3000, C=c, class_weight="balanced", random_state=seed)
        return scaler, clf.fit(scaler.transform(flat[idx]), y[idx])

    best_c, best_f1 = c_grid[0], -1.0
    for c in c_grid if len(lab_va) else ():
        scaler, clf = fit(lab_tr, c)
        f1 = f1_score(y[lab_va], clf.predict(scaler.transform(flat[lab_va])), average="macro")
        if f1 > best_f1:
            best_c, best_f1 = c, f1
    both = np.concatenate([lab_tr, lab_va])
    scaler, clf = fit(both, best_c)
    m = classification_metrics(y[lab_te], clf.predict(scaler.transform(flat[lab_te])), class_names)
    knn = knn_metrics(flat[both], y[both], flat[lab_te], y[lab_te], class_names)
    return {"macro_precision": m["macro_precision"], "macro_recall": m["macro_recall"], "macro_f1": m["macro_f1"],
            "accuracy": m["accuracy"], "knn": knn, "C": best_c}  # fmt: skip
