"""The tree ensemble's CPU evaluation, without torch: the compiled loop shared by the torch module
(``model/trees.py``) and the torch-free runtime (``model/runtime.py``).

Rule per node, as scikit-learn's: a NaN feature goes where ``missing_left`` says, else left if
``x <= threshold``. Leaves add their value to their tree's class; scores start at ``baseline``.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def _evaluate(x, feature, threshold, left, right, missing_left, is_leaf, value, tree_class, n_nodes, out):  # type: ignore[no-untyped-def]
    """out[i, class of tree t] += value of the leaf that row i reaches in tree t.

    Tree by tree, every row through one tree before the next: a tree's nodes (~1.4 KB) stay in L1
    for the whole batch, where row by row the ~1 MB of tables streamed from L2 for every row
    (measured on the default bundle, 750 trees, 64 rows: 21.5 -> 16.3 µs/alert). Each out[i, c] still sums its
    trees in the same order, so the scores are bit-identical."""
    for t in range(tree_class.shape[0]):
        base = t * n_nodes
        c = tree_class[t]
        for i in range(x.shape[0]):
            node = base
            while not is_leaf[node]:
                v = x[i, feature[node]]
                go_left = missing_left[node] if np.isnan(v) else v <= threshold[node]
                node = base + (left[node] if go_left else right[node])
            out[i, c] += value[node]
    return out


def evaluate_trees(x: np.ndarray, tables: dict[str, np.ndarray]) -> np.ndarray:
    """(N, F) float32 features (NaN = missing) -> (N, C) float32 raw scores. ``tables``: flat
    per-node arrays ``feature``, ``threshold``, ``left``, ``right``, ``missing_left``, ``is_leaf``,
    ``value`` (trees x nodes), ``tree_class`` (trees), ``baseline`` (classes)."""
    n_trees = int(tables["tree_class"].shape[0])
    out = np.tile(tables["baseline"].astype(np.float64), (x.shape[0], 1))
    _evaluate(
        np.ascontiguousarray(x, dtype=np.float32), tables["feature"], tables["threshold"], tables["left"],
        tables["right"], tables["missing_left"], tables["is_leaf"], tables["value"], tables["tree_class"],
        tables["feature"].shape[0] // max(n_trees, 1), out,
    )  # fmt: skip
    return out.astype(np.float32)
