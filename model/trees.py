"""A gradient-boosted tree ensemble as torch tensors, so the metadata + history classifier runs in
the same batched graph as the stamp encoder (on the GPU when there is one) and is saved in the
bundle as plain tensors (no pickled estimator is ever loaded).

The trees are grown by LightGBM in the trainer
(``trainer/trees.py`` turns it into ``TreeArrays``); this module only evaluates them. Rule per
node: a NaN feature goes where ``missing_left`` says, else left if
``x <= threshold``. Leaves add their value to their class's raw score; the scores start at
``baseline``. A unit test holds ``TreeEnsemble`` to LightGBM's ``predict_proba`` on data with
NaNs, and to LightGBM's dump walked node by node where a NaN falls in a feature that had none in
training (there the tables send it to the child with more training alerts: ``trainer/trees.py``).

Two evaluations of the same tables: on a GPU, level by level in torch (every tree takes one step
per level at once: gathers over a (batch, trees) index); on the CPU, a compiled loop (numba, GIL
released, so it runs on the inference thread beside torch). Measured on 750 trees of depth 6, 64
alerts per call, one core: torch's gathers 87-174 us per alert, the loop ~30 us. Both are held to
the same references by the unit tests.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from model.tree_kernel import evaluate_trees


@dataclass(frozen=True)
class TreeArrays:
    """All trees padded to the same number of nodes M: (T, M) per-node tables."""

    feature: torch.Tensor  # int64
    threshold: torch.Tensor  # float32
    left: torch.Tensor  # int64
    right: torch.Tensor  # int64
    missing_left: torch.Tensor  # bool
    is_leaf: torch.Tensor  # bool
    value: torch.Tensor  # float32
    tree_class: torch.Tensor  # (T,) int64
    baseline: torch.Tensor  # (C,) float32
    depth: int


class TreeEnsemble(nn.Module):
    def __init__(self, n_trees: int, n_nodes: int, n_classes: int, depth: int) -> None:
        super().__init__()
        self.depth = depth
        self.n_classes = n_classes
        self.feature: torch.Tensor
        self.threshold: torch.Tensor
        self.left: torch.Tensor
        self.right: torch.Tensor
        self.missing_left: torch.Tensor
        self.is_leaf: torch.Tensor
        self.value: torch.Tensor
        self.to_class: torch.Tensor
        self.baseline: torch.Tensor
        self.offset: torch.Tensor
        for name, dtype in (("feature", torch.int64), ("left", torch.int64), ("right", torch.int64)):
            self.register_buffer(name, torch.zeros(n_trees * n_nodes, dtype=dtype))
        self.register_buffer("threshold", torch.zeros(n_trees * n_nodes))
        self.register_buffer("value", torch.zeros(n_trees * n_nodes))
        self.register_buffer("missing_left", torch.zeros(n_trees * n_nodes, dtype=torch.bool))
        self.register_buffer("is_leaf", torch.ones(n_trees * n_nodes, dtype=torch.bool))
        self.register_buffer("to_class", torch.zeros(n_trees, n_classes))
        self.register_buffer("baseline", torch.zeros(n_classes))
        self.register_buffer("offset", torch.arange(n_trees, dtype=torch.int64) * n_nodes)

    @staticmethod
    def from_arrays(a: TreeArrays) -> TreeEnsemble:
        n_trees, n_nodes = a.feature.shape
        m = TreeEnsemble(n_trees, n_nodes, int(a.baseline.shape[0]), a.depth)
        with torch.no_grad():
            for name in ("feature", "threshold", "left", "right", "missing_left", "is_leaf", "value"):
                getattr(m, name).copy_(getattr(a, name).reshape(-1))
            m.to_class.copy_(nn.functional.one_hot(a.tree_class, int(a.baseline.shape[0])).float())
            m.baseline.copy_(a.baseline)
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, F) features (NaN = missing) -> (N, C) raw scores (logits)."""
        if x.device.type == "cpu":
            return self._forward_cpu(x)
        return self.forward_tensors(x)

    def tables(self) -> dict[str, np.ndarray]:
        """The flat per-node arrays of ``model.tree_kernel.evaluate_trees`` (also what the
        torch-free runtime bundle stores)."""
        names = ("feature", "threshold", "left", "right", "missing_left", "is_leaf", "value", "baseline")
        out = {n: getattr(self, n).detach().cpu().numpy() for n in names}
        out["tree_class"] = self.to_class.argmax(1).cpu().numpy()
        return out

    def _forward_cpu(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(evaluate_trees(x.detach().numpy(), self.tables()))

    def forward_tensors(self, x: torch.Tensor) -> torch.Tensor:
        """The same in tensor ops (any device)."""
        n = x.shape[0]
        node = self.offset.unsqueeze(0).expand(n, -1)  # (N, T): every tree at its root
        for _ in range(self.depth):
            f = self.feature[node]
            xv = torch.gather(x, 1, f)
            go_left = torch.where(torch.isnan(xv), self.missing_left[node], xv <= self.threshold[node])
            child = torch.where(go_left, self.left[node], self.right[node]) + self.offset
            node = torch.where(self.is_leaf[node], node, child)
        out: torch.Tensor = self.value[node] @ self.to_class + self.baseline
        return out
