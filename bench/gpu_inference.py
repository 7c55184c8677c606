"""Inference on a GPU: the shipped bundle's forward pass (encoder + stamp probe + fused head) at
several batch sizes and precisions, against fp32 on the CPU, on real alerts.

Two steps, because a GPU machine may hold no Kafka, Redis, fastavro or data:

    python bench/gpu_inference.py prepare --data ../shared/ztf/alerts --out .gpu/inputs.npz
    python bench/gpu_inference.py run --inputs .gpu/inputs.npz [--out DIR]     # on the GPU machine

``prepare`` decodes the alerts with the shared alert package (the consumer's own code) into raw
crops and features; ``run`` needs only torch, numpy, numba and ``model/``. The GPU path mirrors
``consumer.inference.ModelRunner.predict`` (pinned host memory, one forward pass per batch, results
back to the host): times include both copies. Precisions: fp32, and bf16/fp16 autocast (the trees
compare float32 features in every case, so only the encoder and the linear layers change).
Fidelity: the predicted class equal to CPU fp32 on >= 99.5 % of alerts, embedding cosine >= 0.999
(the targets of the performance issue).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prepare(data: list[str], out: Path) -> None:
    from corpus import decode_corpus

    from alerts.files import iter_messages

    d = decode_corpus(iter_messages(data))
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, raw=d.raw, features=d.features)
    print(f"{len(d.raw)} alerts -> {out}")


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.asarray((a * b).sum(axis=1) / np.maximum(den, 1e-12))


def run(inputs: Path, bundle_path: Path, out: Path, seconds: float, device: str) -> None:
    import torch

    from model.bundle import load_bundle
    from model.preprocess import normalise

    d = np.load(inputs)
    raw, features = d["raw"], d["features"]
    n_real = len(raw)
    bundle = load_bundle(bundle_path)
    x_all = normalise(raw)

    cpu_model = bundle.build_alert_model("cpu").to(memory_format=torch.channels_last).eval()
    with torch.inference_mode():
        ref = [
            t.numpy()
            for t in cpu_model(
                torch.from_numpy(x_all).contiguous(memory_format=torch.channels_last), torch.from_numpy(features)
            )
        ]
    ref_z, ref_p = ref[0], ref[2]

    dev = torch.device(device)
    pin = dev.type == "cuda"
    gpu_model = bundle.build_alert_model(dev).to(memory_format=torch.channels_last).eval()
    rows: list[dict[str, object]] = []
    for precision in ("fp32", "bf16", "fp16"):
        dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]

        def forward(x: np.ndarray, f: np.ndarray, dtype: torch.dtype | None = dtype) -> tuple[np.ndarray, np.ndarray]:
            t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
            ft = torch.from_numpy(f)
            if pin:
                t, ft = t.pin_memory(), ft.pin_memory()
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
                z, _, p = gpu_model(t.to(dev, non_blocking=True), ft.to(dev, non_blocking=True))
            return z.float().cpu().numpy(), p.float().cpu().numpy()

        z, p = forward(x_all, features)
        agree = float((p.argmax(1) == ref_p.argmax(1)).mean())
        cos = _cosine(z, ref_z)
        for batch in (64, 256, 1024, 4096, 16384):
            reps = -(-batch // n_real)
            xb = np.concatenate([x_all] * reps)[:batch]
            fb = np.concatenate([features] * reps)[:batch]
            for _ in range(3):
                forward(xb, fb)
            if pin:
                torch.cuda.synchronize()
            n_calls, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                forward(xb, fb)
                n_calls += 1
            dt = time.perf_counter() - t0
            rows.append(
                {
                    "precision": precision, "batch": batch, "alerts_per_s": round(n_calls * batch / dt),
                    "us_per_alert": round(dt / (n_calls * batch) * 1e6, 3),
                    "ms_per_batch": round(dt / n_calls * 1e3, 3),
                    "class_agreement": round(agree, 5), "min_cosine": round(float(cos.min()), 6),
                }
            )  # fmt: skip
            print(json.dumps(rows[-1]), flush=True)

    # The same on this machine's CPU (all its cores), for scale: 64-row chunks as the consumer does.
    torch.set_num_threads(max(1, torch.get_num_threads()))
    xt = torch.from_numpy(x_all).contiguous(memory_format=torch.channels_last)
    ft = torch.from_numpy(features)
    with torch.inference_mode():
        t0 = time.perf_counter()
        done = 0
        while time.perf_counter() - t0 < seconds:
            for i in range(0, n_real - 63, 64):
                cpu_model(xt[i : i + 64], ft[i : i + 64])
                done += 64
        cpu_rate = done / (time.perf_counter() - t0)

    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "gpu": torch.cuda.get_device_name(0) if pin else f"{device} (dry run)",
        "torch": torch.__version__,
        "cpu_threads": torch.get_num_threads(),
        "host": platform.processor() or platform.machine(),
        "alerts": n_real,
        "bundle": f"{bundle.name}:{bundle.version}",
        "cpu_fp32_alerts_per_s": round(cpu_rate),
        "rows": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_inference.json").write_text(json.dumps(info, indent=1))
    lines = [
        f"# GPU inference, {info['date']}, {info['gpu']}, torch {info['torch']}, bundle {info['bundle']}",
        f"CPU fp32 on the same machine ({info['cpu_threads']} threads, 64-row chunks): {info['cpu_fp32_alerts_per_s']} alerts/s",
        "",
        "| precision | batch | alerts/s | µs/alert | ms/batch | class = CPU fp32 | min cosine(z) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['precision']} | {r['batch']} | {r['alerts_per_s']} | {r['us_per_alert']} | {r['ms_per_batch']} "
            f"| {float(r['class_agreement']):.2%} | {r['min_cosine']} |"  # type: ignore[arg-type]
        )
    (out / "gpu_inference.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="decode alerts into crops + features (here)")
    p.add_argument("--data", nargs="+", required=True)
    p.add_argument("--out", type=Path, required=True)
    r = sub.add_parser("run", help="time the forward pass on the GPU")
    r.add_argument("--inputs", type=Path, required=True)
    r.add_argument("--bundle", type=Path, default=ROOT / "model" / "bundles" / "default.pt")
    r.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    r.add_argument("--seconds", type=float, default=2.0, help="timed seconds per row")
    r.add_argument("--device", default="cuda", help="cpu: a dry run of this script where there is no GPU")
    a = ap.parse_args()
    if a.cmd == "prepare":
        prepare(a.data, a.out)
    else:
        run(a.inputs, a.bundle, a.out, a.seconds, a.device)


if __name__ == "__main__":
    main()
