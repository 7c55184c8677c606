"""CPU inference engines for the stamp encoder + probe, on every real alert, against fp32 torch.

    python bench/inference_engines.py [--threads 1]
    # ONNX Runtime rows: pip install onnxruntime onnx (not a dependency of the service)

Rows: torch fp32 (the reference, as the consumer runs it: channels-last, 64-row chunks), torch
bf16 autocast (``model.cpu_precision``), and, where onnxruntime is importable, ONNX Runtime fp32
(CPU execution provider), ONNX Runtime int8 (static QDQ quantisation of every layer calibrated on
1,024 real alerts), the shipped int8 graph of model/bundles/default.npz (trainer/quantize.py), and where openvino is importable, OpenVINO's CPU plugin on the same ONNX graph at f32
and bf16 inference precision. Each: µs per alert of one thread, the predicted stamp class equal to fp32 torch, and the
minimum cosine of z. The fused head (trees + linear correction) is timed apart: it is the same
compiled code in every row. Targets (performance issue): class equal on >= 99.5 % of alerts,
cosine >= 0.999, <= 80 µs/alert.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from corpus import corpus_messages, decode_corpus  # noqa: E402

from model.bundle import load_bundle  # noqa: E402
from model.preprocess import normalise  # noqa: E402
from model.runtime_export import stamp_onnx  # noqa: E402


def inputs() -> tuple[np.ndarray, np.ndarray]:
    d = decode_corpus(corpus_messages()[0])
    return normalise(d.raw), d.features


def per_alert_us(fn: Callable[[np.ndarray], object], x: np.ndarray, reps: int = 3) -> float:
    n = len(x) - len(x) % 64
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for i in range(0, n, 64):
            fn(x[i : i + 64])
        best = min(best, (time.perf_counter() - t) / n * 1e6)
    return best


def fidelity(z: np.ndarray, p: np.ndarray, ref_z: np.ndarray, ref_p: np.ndarray) -> tuple[float, float]:
    cos = (z * ref_z).sum(1) / np.linalg.norm(z, axis=1) / np.linalg.norm(ref_z, axis=1)
    return float((p.argmax(1) == ref_p.argmax(1)).mean()), float(cos.min())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    x, f = inputs()
    bundle = load_bundle(ROOT / "model" / "bundles" / "default.pt")
    model = bundle.build_alert_model("cpu").eval()
    stamp = model.stamp.to(memory_format=torch.channels_last)
    rows: list[tuple[str, float, float, float]] = []
    shipped_z: np.ndarray | None = None

    def torch_run(a_: np.ndarray, bf16: bool) -> tuple[np.ndarray, np.ndarray]:
        t = torch.from_numpy(a_).contiguous(memory_format=torch.channels_last)
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            z, p = stamp(t)
        return z.float().numpy(), p.float().numpy()

    ref_z, ref_p = torch_run(x, False)
    for name, bf16 in (("torch fp32 (reference)", False), ("torch bf16 autocast", True)):
        z, p = torch_run(x, bf16)
        rows.append((name, per_alert_us(lambda b, bf=bf16: torch_run(b, bf), x), *fidelity(z, p, ref_z, ref_p)))
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        ort = None
        print("(onnxruntime not installed: ONNX Runtime rows skipped)")
    if ort is not None:
        tmp = Path(tempfile.mkdtemp())
        (tmp / "stamp.onnx").write_bytes(stamp_onnx(load_bundle(ROOT / "model" / "bundles" / "default.pt")))

        class Calibration(CalibrationDataReader):  # type: ignore[misc]
            def __init__(self) -> None:
                self.it = iter([{"x": x[i : i + 64]} for i in range(0, min(1024, len(x)), 64)])

            def get_next(self) -> dict[str, np.ndarray] | None:
                return next(self.it, None)

        quant_pre_process(str(tmp / "stamp.onnx"), str(tmp / "pre.onnx"))
        quantize_static(str(tmp / "pre.onnx"), str(tmp / "int8.onnx"), Calibration(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)  # fmt: skip
        for name, path in (("ONNX Runtime fp32", "stamp.onnx"), ("ONNX Runtime int8 (static, QDQ)", "int8.onnx")):
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
            sess = ort.InferenceSession(str(tmp / path), so, providers=["CPUExecutionProvider"])
            z, p = sess.run(None, {"x": x})
            rows.append((name, per_alert_us(lambda b, s=sess: s.run(None, {"x": b}), x), *fidelity(z, p, ref_z, ref_p)))
        from model.runtime import load_runtime

        shipped = load_runtime(ROOT / "model" / "bundles" / "default.npz")
        if shipped.onnx_int8:  # convs 2-4 int8 after equalisation + distillation (trainer/quantize.py)
            so = ort.SessionOptions()
            so.intra_op_num_threads, so.inter_op_num_threads = a.threads, 1
            sess = ort.InferenceSession(shipped.onnx_int8, so, providers=["CPUExecutionProvider"])
            z, p = sess.run(None, {"x": x})
            rows.append(("ONNX Runtime int8, equalised + distilled (shipped default.npz)",
                         per_alert_us(lambda b, s=sess: s.run(None, {"x": b}), x), *fidelity(z, p, ref_z, ref_p)))  # fmt: skip
            shipped_z = z
        try:
            import openvino as ov
        except ImportError:
            ov = None
            print("(openvino not installed: OpenVINO rows skipped)")
        if ov is not None:
            core = ov.Core()
            for precision in ("f32", "bf16"):
                compiled = core.compile_model(str(tmp / "stamp.onnx"), "CPU", {
                    "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": a.threads,
                    "PERFORMANCE_HINT": "LATENCY"})  # fmt: skip
                request = compiled.create_infer_request()

                def run_ov(b: np.ndarray, r: object = request) -> tuple[np.ndarray, np.ndarray]:
                    res = r.infer({"x": b})  # type: ignore[attr-defined]
                    return np.asarray(res[0]), np.asarray(res[1])

                parts = [run_ov(x[i : i + 64]) for i in range(0, len(x), 64)]
                z = np.concatenate([q[0] for q in parts])
                p = np.concatenate([q[1] for q in parts])
                rows.append((f"OpenVINO {ov.__version__.split('-')[0]} {precision}", per_alert_us(run_ov, x),
                             *fidelity(z, p, ref_z, ref_p)))  # fmt: skip
    head = model.head
    zt, ft = torch.from_numpy(ref_z), torch.from_numpy(f)
    head_us = float("nan")
    if head is not None:
        with torch.inference_mode():
            head_us = per_alert_us(lambda b: head(zt[: len(b)], ft[: len(b)]), x)
    print(f"# CPU inference engines, {len(x)} alerts, {a.threads} thread(s), bundle {bundle.name}:{bundle.version}\n")
    print("| engine (encoder + stamp probe) | µs/alert | stamp class = fp32 torch | min cosine(z) |")
    print("|---|---|---|---|")
    for name, us, agree, cos in rows:
        print(f"| {name} | {us:.0f} | {100 * agree:.2f} % | {cos:.5f} |")
    print(f"\nFused head (trees + linear correction), every row: {head_us:.0f} µs/alert")
    # the published class (fused head) under bf16 against fp32, the head itself in float32
    ft_all = torch.from_numpy(f)
    with torch.inference_mode():
        full = model.to(memory_format=torch.channels_last)
        t = torch.from_numpy(x).contiguous(memory_format=torch.channels_last)
        p32 = full(t, ft_all)[2].numpy()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            p16 = full(t, ft_all)[2].float().numpy()
    print(f"Published (fused) class under bf16 autocast = fp32: {100 * (p16.argmax(1) == p32.argmax(1)).mean():.2f} %")
    if shipped_z is not None and head is not None:
        with torch.inference_mode():
            p8 = head(torch.from_numpy(shipped_z), ft_all).numpy()
        cos = (shipped_z * ref_z).sum(1) / np.linalg.norm(shipped_z, axis=1) / np.linalg.norm(ref_z, axis=1)
        print(f"Shipped int8 graph: published (fused) class = fp32 on {100 * (p8.argmax(1) == p32.argmax(1)).mean():.2f} %"
              f" of alerts; cosine(z) mean {cos.mean():.5f}, 1st percentile {np.percentile(cos, 1):.5f}, min {cos.min():.5f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
