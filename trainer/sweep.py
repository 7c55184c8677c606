"""`trainer sweep`: the study's three experiments (augmentation; latent dimension; learning rate)
plus the variants that try to beat it, each over several seeds (seed = split + initialisation), with
the raw-pixel logistic regression on the same splits as the reference. One table in the study's form.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from config import TrainerConfig

log = logging.getLogger("stampstream.trainer")

BASELINE_NAME = "study AE z=42 (flips+rotations, lr 3.33e-5)"
EXPERIMENTS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "augmentation": [
        ("none", {"augment": "none"}),
        ("flips+rotations", {}),
        ("flips+rotations+tile shuffle", {"augment": "flips_rotations_tiles"}),
    ],
    "latent dim": [(f"z={d}", {"latent_dim": d}) for d in (10, 21, 42, 130)],
    "learning rate": [(f"lr={lr:g}", {"lr": lr}) for lr in (3.33e-4, 3.33e-5, 3.33e-6)],
    "beyond the study": [
        ("AE + invariance z=42", {"extra_objective": "invariance"}),
        ("AE + invariance z=130", {"extra_objective": "invariance", "latent_dim": 130}),
        ("VAE z=42", {"kind": "vae"}),
        ("AE + contrastive z=42", {"extra_objective": "contrastive", "extra_weight": 1.0}),
        ("AE + contrastive z=42, up to 300 epochs", {"extra_objective": "contrastive", "extra_weight": 1.0, "max_epochs": 300}),
        ("AE + contrastive z=130, up to 300 epochs",
         {"extra_objective": "contrastive", "extra_weight": 1.0, "max_epochs": 300, "latent_dim": 130}),
        # Narrower convolutions: the consumer's inference cost scales with channels squared.
        ("AE + contrastive z=42, 16-32 channels, up to 300 epochs",
         {"extra_objective": "contrastive", "extra_weight": 1.0, "max_epochs": 300, "channels": (16, 32)}),
        ("AE + contrastive z=42, 8-16 channels, up to 300 epochs",
         {"extra_objective": "contrastive", "extra_weight": 1.0, "max_epochs": 300, "channels": (8, 16)}),
    ],
}

_DATASET = None


def _effective(overrides: dict[str, Any], base: TrainerConfig) -> dict[str, Any]:
    """Overrides that differ from the base config (so 'z=42' and the default are one run)."""

    def current(k: str) -> Any:
        return getattr(base.autoencoder, k) if hasattr(base.autoencoder, k) else getattr(base, k)

    return {k: v for k, v in overrides.items() if current(k) != (tuple(v) if isinstance(v, list) else v)}


def _key(overrides: dict[str, Any]) -> str:
    def text(v: Any) -> str:
        return "x".join(map(str, v)) if isinstance(v, tuple | list) else str(v)

    return "default" if not overrides else "_".join(f"{k}-{text(v)}" for k, v in sorted(overrides.items()))


def _init(paths: list[str], labels_csv: str | None, limit: int | None) -> None:
    global _DATASET
    import torch

    from trainer.data import load_dataset, read_labels

    torch.set_num_threads(1)
    _DATASET = load_dataset(paths, read_labels(labels_csv) if labels_csv else {}, limit)


def _one(cfg_dict: dict[str, Any], run_dir: str, smoke: bool) -> dict[str, Any]:
    from config.trainer import trainer_config_from_dict
    from trainer import run_folder as rf
    from trainer.fit import EVAL_VERSION, reevaluate_run, run_fit

    assert _DATASET is not None
    cfg = trainer_config_from_dict(cfg_dict)
    if rf.is_finished(Path(run_dir)):
        metrics = rf.load_metrics(Path(run_dir))
        if metrics.get("eval_version") == EVAL_VERSION:
            return metrics
        if rf.has_weights(Path(run_dir)):
            return reevaluate_run(Path(run_dir), _DATASET, cfg)
    return run_fit(cfg, _DATASET, Path(run_dir), smoke=smoke, show_progress=False)


def _mean_std(values: Sequence[float]) -> str:
    a = 100 * np.asarray(values, dtype=float)
    return f"{a.mean():.1f} ± {a.std(ddof=1) if len(a) > 1 else 0.0:.1f}"


def run_sweep(
    base: TrainerConfig,
    paths: list[str],
    labels_csv: str | None,
    out: Path,
    seeds: int = 3,
    jobs: int = 1,
    max_epochs: int | None = None,
    smoke: bool = False,
    limit: int | None = None,
    only: str | None = None,
) -> str:
    """Every row of EXPERIMENTS (or, with ``only``, the rows whose name contains it) over seeds;
    finished runs in ``out`` are reused, so a sweep can be resumed or extended row by row."""
    out.mkdir(parents=True, exist_ok=True)
    configs: dict[str, dict[str, Any]] = {}
    for rows in EXPERIMENTS.values():
        for name, ov in rows:
            if only is not None and only not in name:
                continue
            eff = _effective(ov, base)
            configs[_key(eff)] = eff
    tasks = []
    for key, ov in configs.items():
        for seed in range(seeds):
            cfg = base.with_overrides(seed=seed, device="cpu" if jobs > 1 else base.device, **ov)
            if max_epochs is not None and "max_epochs" not in ov:  # a row may set its own
                cfg = cfg.with_overrides(max_epochs=max_epochs)
            tasks.append((key, seed, cfg.to_dict(), str(out / key / f"seed{seed}")))
    results: dict[tuple[str, int], dict[str, Any]] = {}
    if jobs == 1:  # in this process: no pool to start, nothing forked
        _init(paths, labels_csv, limit)
        for k, s, c, d in tqdm(tasks, desc="sweep", unit="run"):
            results[(k, s)] = _one(c, d, smoke)
    else:
        # spawn, not fork: a child forked from a process whose OpenMP/BLAS threads already ran can
        # deadlock in its first parallel region (seen: sklearn's k-NN hanging in a forked worker)
        ctx = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=jobs, mp_context=ctx, initializer=_init,
                                 initargs=(paths, labels_csv, limit)) as pool:  # fmt: skip
            futs = {pool.submit(_one, c, d, smoke): (k, s) for k, s, c, d in tasks}
            for fut in tqdm(as_completed(futs), total=len(futs), desc="sweep", unit="run"):
                results[futs[fut]] = fut.result()
    table = format_table(results, seeds, base, max_epochs)
    (out / "sweep.md").write_text(table)
    (out / "sweep.json").write_text(json.dumps({f"{k}/seed{s}": v for (k, s), v in results.items()}, indent=1))
    return table


def format_table(results: dict[tuple[str, int], dict[str, Any]], seeds: int, base: TrainerConfig, max_epochs: int | None) -> str:
    def row(model: str, runs: list[dict[str, Any]]) -> str:
        p = [r["probe"] for r in runs]
        t = [r["probe_tta"] for r in runs]
        return (
            f"| {model} | {_mean_std([m['macro_precision'] for m in p])} | {_mean_std([m['macro_recall'] for m in p])} "
            f"| {_mean_std([m['macro_f1'] for m in p])} | {np.mean([r['test_mse'] for r in runs]):.5f} "
            f"| {_mean_std([m['macro_f1'] for m in t])} | {_mean_std([r['knn']['accuracy'] for r in runs])} "
            f"| {_mean_std([r['knn_tta']['accuracy'] for r in runs])} | {np.mean([r['epochs_run'] for r in runs]):.0f} |"
        )

    head = (
        "| model | precision % | recall % | F1 % | MSE | F1 % (8-fold pooled z) | kNN acc % | kNN acc % (pooled z) | epochs |\n"
        "|---|---|---|---|---|---|---|---|---|"
    )
    lines = [
        f"Macro scores of the linear probe on the test objects, mean ± std over {seeds} seeds "
        f"(each seed: its own split by objectId and initialisation). Defaults: {BASELINE_NAME}, batch {base.batch_size}, "
        f"patience {base.patience}, up to {max_epochs or base.max_epochs} epochs.",
        "",
    ]
    for exp, rows in EXPERIMENTS.items():
        section = []
        for name, ov in rows:
            key = _key(_effective(ov, base))
            runs = [results[(key, s)] for s in range(seeds) if (key, s) in results]
            if runs:
                section.append(row(name, runs))
        if section:  # a sweep with --only has rows in some sections only
            lines += [f"**{exp}**", "", head, *section, ""]
    base_runs = [results[("default", s)] for s in range(seeds) if ("default", s) in results]
    if base_runs:
        raw = [r["raw_pixels_logreg"] for r in base_runs]
        lines += [
            "**reference**: logistic regression on the raw 2x21x21 pixels, same splits",
            "",
            "| model | precision % | recall % | F1 % | kNN acc % |",
            "|---|---|---|---|---|",
            f"| raw pixels | {_mean_std([m['macro_precision'] for m in raw])} | {_mean_std([m['macro_recall'] for m in raw])} "
            f"| {_mean_std([m['macro_f1'] for m in raw])} | {_mean_std([m['knn']['accuracy'] for m in raw])} |",
            "",
        ]
    return "\n".join(lines)


def default_jobs() -> int:
    return max(1, (os.cpu_count() or 1))
