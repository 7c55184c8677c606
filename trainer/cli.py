"""`trainer fit | report | sweep | export` - offline training of the stamp autoencoder and probe."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from config import TrainerConfig, load_trainer_config
from config.trainer import HeadConfig


def _trainer_cfg(args: argparse.Namespace) -> TrainerConfig:
    cfg = load_trainer_config(args.config)
    if getattr(args, "device", None):
        cfg = dataclasses.replace(cfg, device=args.device)
    if getattr(args, "max_epochs", None):
        cfg = dataclasses.replace(cfg, max_epochs=args.max_epochs)
    if getattr(args, "smoke", False):
        cfg = dataclasses.replace(cfg, max_epochs=2, probe_epochs=20, patience=2, probe_l2_grid=(1e-2,),
                                  head=HeadConfig(bag=2, max_iter=15, max_depth=4, cv_seeds=1, cv_folds=3, inner_folds=2))
    return cfg


def _labels_path(cfg: TrainerConfig, data: Sequence[str], explicit: str | None) -> str | None:
    from trainer.data import find_labels_csv

    if explicit:
        return explicit
    if cfg.labels_csv:
        return cfg.labels_csv
    found = find_labels_csv(data)
    return str(found) if found else None


def cmd_fit(args: argparse.Namespace) -> int:
    from trainer.data import load_dataset, read_labels
    from trainer.fit import run_fit

    cfg = _trainer_cfg(args)
    if args.survey == "lsst" and args.encoder:
        raise SystemExit("--encoder: a Rubin run trains the encoder and nothing else")
    if args.survey == "lsst":  # no labels for Rubin: the encoder alone (trainer/rubin.py)
        from trainer.rubin import fit_rubin

        m = fit_rubin(cfg, list(args.data), Path(args.out), smoke=args.smoke)
        print(f"fit done (lsst): {m['alerts']} alerts of {m['objects']} objects, test MSE {m['test_mse']:.5f} "
              f"(mean crop: {m['test_mse_mean_crop']:.5f}), epochs {m['epochs_run']}; run dir {args.out}")  # fmt: skip
        return 0
    labels_csv = _labels_path(cfg, args.data, args.labels)
    labels = read_labels(labels_csv) if labels_csv else {}
    ds = load_dataset(args.data, labels, limit=200 if args.smoke else None)
    logging.info("data: %s (labels: %s)", ds.summary(), labels_csv)
    if not labels:
        logging.warning("no labels: the probe and its scores need a labels CSV (--labels)")
    encoder = Path(args.encoder) if args.encoder else None
    metrics = run_fit(cfg, ds, Path(args.out), data_paths=list(args.data), smoke=args.smoke, baseline=not args.smoke,
                      encoder_from=encoder)  # fmt: skip
    p = metrics["probe_tta" if metrics["tta_dihedral"] else "probe"]
    trained = (
        f"test MSE {metrics['test_mse']:.5f}, epochs {metrics['epochs_run']}" if encoder is None
        else "encoder of {bundle}:{version}, not trained".format(**metrics["encoder_from"])
    )  # fmt: skip
    print(f"fit done: macro F1 {100 * p['macro_f1']:.1f} % (8-fold pooled: {metrics['tta_dihedral']}), {trained}; "
          f"run dir {args.out}")  # fmt: skip
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from trainer.report import write_report

    if (Path(args.run_dir) / "encoder.pt").exists():  # a Rubin run (trainer/rubin.py)
        from trainer.rubin import write_rubin_report

        print(f"report: {write_rubin_report(Path(args.run_dir))}")
        return 0
    path = write_report(Path(args.run_dir))
    print(f"report: {path}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from trainer.export import export_bundle

    if (Path(args.run_dir) / "encoder.pt").exists():  # a Rubin run: the encoder, no classes
        from trainer.rubin import export_rubin

        pt, npz = export_rubin(Path(args.run_dir), Path(args.out), args.name, args.version or Path(args.run_dir).name)
        print(f"Rubin bundles (encoder only, no classes) written to {pt} (torch) and {npz} (runtime)")
        if args.int8:
            data = json.loads((Path(args.run_dir) / "metrics.json").read_text()).get("data", [])
            _add_int8(pt, npz, [d for d in data if Path(d).exists()])
        return 0

    pooled = {"auto": None, "on": True, "off": False}[args.pooling]
    bundle = export_bundle(Path(args.run_dir), Path(args.out), name=args.name, version=args.version, pooled=pooled)
    print(f"bundle {bundle.name}:{bundle.version} written to {args.out}")
    from model.runtime_export import export_runtime

    runtime = Path(args.out).with_suffix(".npz")  # the same model without torch (model/runtime.py)
    export_runtime(args.out, runtime)
    print(f"runtime bundle (ONNX Runtime, no torch) written to {runtime}")
    if args.int8:
        from trainer import run_folder as rf

        _add_int8(Path(args.out), runtime, [d for d in rf.load_config(Path(args.run_dir)).data if Path(d).exists()])
    return 0


def _add_int8(pt: Path, npz: Path, data: list[str]) -> None:
    """The runtime bundle + the int8 graph, calibrated and distilled on the run's alerts (trainer/quantize.py)."""
    if not data:
        print("int8 graph skipped: the run's data paths are not here (python -m trainer.quantize --data ...)")
        return
    from trainer.quantize import export_int8

    rb = export_int8(pt, npz, data)
    print(f"int8 graph {'added to' if rb.onnx_int8 else 'below the fidelity targets, not in'} {npz}")


def cmd_sweep(args: argparse.Namespace) -> int:
    from trainer.sweep import run_sweep

    cfg = _trainer_cfg(args)
    labels_csv = _labels_path(cfg, args.data, args.labels)
    table = run_sweep(
        cfg, list(args.data), labels_csv, Path(args.out), seeds=args.seeds, jobs=args.jobs,
        max_epochs=args.max_epochs, smoke=args.smoke, limit=200 if args.smoke else None, only=args.only,
    )  # fmt: skip
    print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    p = argparse.ArgumentParser(prog="trainer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("fit", help="train the autoencoder, then the linear probe; evaluate")
    f.add_argument("--config", default=None, help="YAML with a trainer: section (default: the study's defaults)")
    f.add_argument("--data", nargs="+", required=True, help="Avro files or folders of alerts")
    f.add_argument("--labels", default=None, help="CSV with candid,label (default: labels.csv beside the data)")
    f.add_argument("--out", required=True, help="run folder (a rerun resumes from its checkpoint)")
    f.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    f.add_argument("--max-epochs", type=int, default=None)
    f.add_argument("--smoke", action="store_true", help="a few steps on 200 alerts (CI)")
    f.add_argument("--survey", choices=["ztf", "lsst"], default="ztf",
                   help="lsst: Rubin alerts, the encoder alone (no labels: no classifier)")
    f.add_argument("--encoder", default=None, metavar="BUNDLE",
                   help="take this bundle's encoder as it is instead of training one, and fit only the probe and "
                        "the classifier: the published embeddings (and the similarity index) stay the bundle's")
    f.set_defaults(func=cmd_fit)
    r = sub.add_parser("report", help="Markdown + PNG report of a run")
    r.add_argument("run_dir")
    r.set_defaults(func=cmd_report)
    e = sub.add_parser("export", help="write the model bundle of a run")
    e.add_argument("run_dir")
    e.add_argument("--out", required=True)
    e.add_argument("--name", default="stampstream-ae")
    e.add_argument("--version", default=None, help="default: the run folder's name")
    e.add_argument("--pooling", choices=["auto", "on", "off"], default="auto",
                   help="embedding averaged over the 8 flips/rotations: auto = the fused head's (trainer config "
                        "head.embedding), or without a head whichever scored better")
    e.add_argument("--int8", action=argparse.BooleanOptionalAction, default=True,
                   help="add the int8 graph to the runtime bundle (calibrated on the run's alerts; default on)")
    e.set_defaults(func=cmd_export)
    s = sub.add_parser("sweep", help="the study's experiments over seeds, one table")
    s.add_argument("--config", default=None)
    s.add_argument("--data", nargs="+", required=True)
    s.add_argument("--labels", default=None)
    s.add_argument("--out", required=True)
    s.add_argument("--seeds", type=int, default=3)
    s.add_argument("--jobs", type=int, default=1, help="runs in parallel (CPU processes)")
    s.add_argument("--max-epochs", type=int, default=None, help="cap on epochs per run (time budget)")
    s.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None)
    s.add_argument("--smoke", action="store_true")
    s.add_argument("--only", default=None, help="run only the rows whose name contains this text")
    s.set_defaults(func=cmd_sweep)
    args = p.parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())

