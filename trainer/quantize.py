"""An int8 encoder for the CPU runtime, by quantisation-aware distillation.

Why: the encoder is ~10 M multiply-adds per alert; in float32 it costs ~170 µs/alert of one core
(ONNX Runtime), the largest stage of the consumer, and the performance issue asks for <= 80 µs with
the embedding's cosine >= 0.999 and the class identical on >= 99.5 % against fp32 torch. Plain
post-training int8 (ONNX Runtime static QDQ, per-channel weights) of the middle and last convs
reaches 63 µs but only cosine 0.998 mean / 0.988 min (docs/benchmarks.md): the rounding of four
activation maps adds up in z. Here a copy of the encoder (the student) is fine-tuned to reproduce
the shipped fp32 encoder's z (the teacher) *through* a simulation of exactly that int8 arithmetic
(fake quantisation: per-channel symmetric int8 weights of convs 2-4, uint8 activations with
MinMax ranges as ONNX Runtime calibrates them); then the student is exported to ONNX and
quantised by ONNX Runtime as before. The reference stays the teacher: every fidelity figure is
int8 student against fp32 teacher. The first conv and the linear layers stay float32 (they cost
~1 µs/alert together and are the most sensitive).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model.autoencoder import Encoder, dihedral_views
from model.bundle import Bundle, load_bundle
from model.classifier import StampClassifier
from model.runtime import RuntimeBundle, RuntimeModel, check_inputs, cosines, load_runtime, save_runtime
from model.runtime_export import EncoderMean, onnx_graph
from trainer.data import load_dataset

# Encoder.features: [0 conv, 1 relu, 2 conv, 3 relu, 4 pool, 5 conv, 6 relu, 7 conv, 8 relu, 9 pool, 10 flatten]
INT8_CONVS = (2, 5, 7)  # convs 2-4 in int8; conv 1 (2 input channels, 2 % of the work) and fc stay float32
# Weights in [-64, 64] (ONNX Runtime's reduce_range for int8 weights), not [-127, 127]. Why: on
# x86 without AVX-512 VNNI, ONNX Runtime's u8 x s8 kernel adds products in pairs into int16
# (vpmaddubsw), which saturates once 2 x 255 x |w| passes 32,767; with |w| <= 64 it cannot
# (2 x 255 x 64 = 32,640), so one graph gives the same integers on every x86 CPU. Measured 2026-11-27 on an AMD EPYC with AVX2
# only: the full-range graph's z had cosine 0.99697 against the z stored at export (the consumer's
# self-check refused it and ran float32); the reduced-range graph reproduces it (docs/benchmarks.md).
WEIGHT_QMAX = 64


def _convs(encoder: Encoder) -> tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d, nn.Conv2d]:
    f = encoder.features
    c = (f[0], *(f[i] for i in INT8_CONVS))
    assert all(isinstance(m, nn.Conv2d) for m in c), "not the study's encoder"
    return cast(tuple[nn.Conv2d, nn.Conv2d, nn.Conv2d, nn.Conv2d], c)


def _fq_act(x: torch.Tensor, hi: float) -> torch.Tensor:
    """uint8, zero point 0: a ReLU output's MinMax range [0, hi] as ONNX Runtime calibrates it."""
    return torch.fake_quantize_per_tensor_affine(x, max(hi, 1e-8) / 255.0, 0, 0, 255)


def _fq_weight(w: torch.Tensor) -> torch.Tensor:
    """Per output channel, symmetric in [-WEIGHT_QMAX, WEIGHT_QMAX] (ONNX Runtime's QInt8
    per-channel weights with reduce_range)."""
    scale = (w.detach().abs().amax(dim=(1, 2, 3)).clamp_min(1e-8) / WEIGHT_QMAX).float()
    zero = torch.zeros(w.shape[0], dtype=torch.int32, device=w.device)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -WEIGHT_QMAX, WEIGHT_QMAX)


def _forward(encoder: Encoder, x: torch.Tensor, ranges: list[float] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The encoder's forward pass -> (the four ReLU maps int8 sees: conv 2's input and the outputs
    of convs 2-4, z); with ``ranges``, with the int8 graph's rounding (straight-through gradients)."""
    c1, c2, c3, c4 = _convs(encoder)

    def act(h: torch.Tensor, k: int) -> torch.Tensor:
        return h if ranges is None else _fq_act(h, ranges[k])

    def weight(w: torch.Tensor) -> torch.Tensor:
        return w if ranges is None else _fq_weight(w)

    h1 = act(F.relu(c1(x)), 0)
    h2 = act(F.relu(F.conv2d(h1, weight(c2.weight), c2.bias, padding=1)), 1)
    h3 = act(F.relu(F.conv2d(F.max_pool2d(h2, 2), weight(c3.weight), c3.bias, padding=1)), 2)
    h4 = act(F.relu(F.conv2d(h3, weight(c4.weight), c4.bias, padding=1)), 3)
    z: torch.Tensor = encoder.fc(F.max_pool2d(h4, 2).flatten(1))
    return [h1, h2, h3, h4], z


def activation_ranges(encoder: Encoder, x: torch.Tensor, chunk: int = 1024) -> list[float]:
    """The max of the four ReLU maps that int8 sees, over x."""
    hi = [0.0] * 4
    with torch.no_grad():
        for i in range(0, len(x), chunk):
            for k, h in enumerate(_forward(encoder, x[i : i + chunk])[0]):
                hi[k] = max(hi[k], float(h.max()))
    return hi


def _channel_max(encoder: Encoder, x: torch.Tensor, point: int) -> torch.Tensor:
    with torch.no_grad():
        return _forward(encoder, x)[0][point].amax(dim=(0, 2, 3))


def equalise(encoder: Encoder, x: torch.Tensor, alpha: tuple[float, ...] = (0.5, 0.75, 0.75, 1.0),
             max_gain: float = 64.0) -> Encoder:
    """The same function with every channel of the four int8 activation maps scaled up towards the
    map's largest channel (ReLU and max-pool commute with a positive per-channel factor k: the
    producing layer's output channel is multiplied by k, the consuming layer's input weights
    divided by it). Per-tensor uint8 then spends its 256 levels on every channel, not only on the
    loudest one (measured: channel maxima spread 8x in the last map). ``alpha`` per map: k =
    (max / channel max) ** alpha; below 1 where the consuming conv is int8 too (its per-channel
    weights lose precision in the columns divided by k), 1 before the float32 linear layer.
    Measured on the real alerts (simulated int8, cosine of z): no equalisation 0.9978 mean / 0.988
    min; alpha 1 everywhere 0.9993 / 0.9968; these 0.99945 / 0.9972."""
    enc = copy.deepcopy(encoder).eval()
    c1, c2, c3, c4 = _convs(enc)
    pairs: tuple[tuple[nn.Conv2d, nn.Conv2d | nn.Linear], ...] = ((c1, c2), (c2, c3), (c3, c4), (c4, enc.fc))
    with torch.no_grad():
        for point, (prod, cons) in enumerate(pairs):
            r = _channel_max(enc, x, point)
            alive = r > 0
            k = torch.ones_like(r)
            k[alive] = ((r[alive].max() / r[alive]) ** alpha[point]).clamp(max=max_gain)
            prod.weight.mul_(k.view(-1, 1, 1, 1))
            if prod.bias is not None:
                prod.bias.mul_(k)
            if isinstance(cons, nn.Linear):  # flatten of (C, 5, 5): input channel c is columns c*25..c*25+24
                cols = cons.weight.view(cons.weight.shape[0], len(k), -1)
                cols.div_(k.view(1, -1, 1))
            else:
                cons.weight.div_(k.view(1, -1, 1, 1))
    return enc


class SimulatedInt8Encoder(nn.Module):
    """The encoder's forward pass with the int8 graph's rounding (straight-through gradients)."""

    def __init__(self, encoder: Encoder, ranges: list[float]) -> None:
        super().__init__()
        self.encoder = encoder
        self.ranges = ranges

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _forward(self.encoder, x, self.ranges)[1]


@dataclass(frozen=True)
class DistilConfig:
    """Measured (held-out objects, 80/20 split): equalisation alone 0.99944 mean / 0.9984 1st
    percentile / 0.9975 min cosine; + 3 epochs at 5e-6: 0.99964 / 0.9990 / 0.9987. Higher rates
    overshoot (the loss rises after the second epoch at 1e-5)."""

    epochs: int = 3
    lr: float = 5e-6
    batch: int = 128
    seed: int = 0
    augment: bool = True  # the 8 flips/rotations of each stamp (the teacher's z of each view)


def distil(teacher: Encoder, start: Encoder, x: np.ndarray, cfg: DistilConfig, log: Any = print) -> Encoder:
    """A student encoder whose simulated-int8 z matches the teacher's fp32 z on the stamps x
    (N, 2, 21, 21) normalised. Loss: 1 - cosine + MSE in units of the teacher's per-dimension std."""
    torch.manual_seed(cfg.seed)
    teacher = teacher.eval()
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    if cfg.augment:
        xt = torch.cat(dihedral_views(xt), dim=0)
    with torch.no_grad():
        zt = torch.cat([teacher(xt[i : i + 1024])[0] for i in range(0, len(xt), 1024)])
    zstd = zt.std(dim=0).clamp_min(1e-6)
    student = copy.deepcopy(start).train()
    opt = torch.optim.Adam(student.parameters(), lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    calib = torch.from_numpy(np.ascontiguousarray(x[:2048], dtype=np.float32))
    for epoch in range(cfg.epochs):
        sim = SimulatedInt8Encoder(student, activation_ranges(student, calib))
        order = torch.randperm(len(xt), generator=gen)
        total = 0.0
        for i in range(0, len(xt), cfg.batch):
            idx = order[i : i + cfg.batch]
            zs, ref = sim(xt[idx]), zt[idx]
            loss = (1 - F.cosine_similarity(zs, ref, dim=1)).mean() + (((zs - ref) / zstd) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
        log(f"distil epoch {epoch + 1}/{cfg.epochs}: loss {total / len(xt):.6f}")
    return student.eval()


def quantise_onnx(fp32: bytes, calibration: np.ndarray) -> bytes:
    """ONNX Runtime static QDQ int8 of convs 2-4 (per-channel int8 weights in [-WEIGHT_QMAX,
    WEIGHT_QMAX], uint8 activations, MinMax ranges from ``calibration``); the first conv and the
    linear layers stay float32."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self.it = iter([{"x": calibration[i : i + 256]} for i in range(0, len(calibration), 256)])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self.it, None)

    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        (tmp / "fp32.onnx").write_bytes(fp32)
        quant_pre_process(str(tmp / "fp32.onnx"), str(tmp / "pre.onnx"))
        graph = onnx.load(str(tmp / "pre.onnx")).graph
        convs = [n.name for n in graph.node if n.op_type == "Conv"]
        keep = [convs[0]] + [n.name for n in graph.node if n.op_type in ("Gemm", "MatMul")]
        quantize_static(str(tmp / "pre.onnx"), str(tmp / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                        reduce_range=True, nodes_to_exclude=keep)  # fmt: skip
        return (tmp / "int8.onnx").read_bytes()


def fidelity(bundle: Bundle, graph: bytes, x: np.ndarray, features: np.ndarray) -> dict[str, float]:
    """An encoder + probe graph against the torch bundle in fp32 on normalised stamps x: cosine of z
    (mean, 1st percentile, min), the stamp probe's class and the published (fused) class, equal."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(graph, so, providers=["CPUExecutionProvider"])
    model = bundle.build_alert_model("cpu").eval()
    with torch.inference_mode():
        z_t, ps_t, p_t = (t.numpy() for t in model(torch.from_numpy(x), torch.from_numpy(features)))
        outs = session.run(None, {"x": x})
        z = np.asarray(outs[0], np.float32)
    cos = cosines(z, z_t)
    fid = {"alerts": len(x), "cosine_mean": float(cos.mean()), "cosine_p1": float(np.percentile(cos, 1)),
           "cosine_min": float(cos.min())}  # fmt: skip
    if not bundle.class_names:  # an encoder without classes (Rubin): z is all there is
        return fid
    ps = np.asarray(outs[1], np.float32)
    with torch.inference_mode():
        p = model.head(torch.from_numpy(z), torch.from_numpy(features)).numpy() if model.head is not None else ps
    return fid | {"stamp_class_equal": float((ps.argmax(1) == ps_t.argmax(1)).mean()),
                  "class_equal": float((p.argmax(1) == p_t.argmax(1)).mean())}  # fmt: skip


# The performance issue's fidelity targets; an int8 graph below them is not put in the bundle.
MIN_COSINE_MEAN = 0.999
MIN_CLASS_EQUAL = 0.995


def with_int8(bundle: Bundle, runtime: RuntimeBundle, x: np.ndarray, features: np.ndarray,
              cfg: DistilConfig = DistilConfig(), log: Any = print) -> RuntimeBundle:
    """``runtime`` plus the int8 graph of ``bundle``'s encoder: equalised, distilled through the
    simulated int8 arithmetic on the stamps x (N, 2, 21, 21) normalised, quantised by ONNX Runtime
    with MinMax ranges from the first 2,048; its fidelity against fp32 torch on all of x recorded
    in the bundle, and the int8 z on ``model.runtime.check_inputs()`` for the consumer's
    self-check. Below the targets: ``runtime`` unchanged (float32 only), and the reason logged."""
    teacher = bundle.build("cpu").eval()
    start = equalise(teacher.encoder, torch.from_numpy(x))
    student = distil(teacher.encoder, start, x, cfg, log) if cfg.epochs else start
    if bundle.class_names:
        graph = quantise_onnx(onnx_graph(student_classifier(teacher, student), ("z", "p")), x[:2048])
    else:  # the runtime's encoder-only graph (model/runtime_export.py: z alone)
        graph = quantise_onnx(onnx_graph(EncoderMean(student), ("z",)), x[:2048])
    fid = fidelity(bundle, graph, x, features) | {"calibration_alerts": min(len(x), 2048),
                                                   "distil_epochs": cfg.epochs, "distil_lr": cfg.lr}  # fmt: skip
    classes = (f"; published class equal {100 * fid['class_equal']:.2f} %, stamp-probe class equal "
               f"{100 * fid['stamp_class_equal']:.2f} %") if "class_equal" in fid else " (no classes)"  # fmt: skip
    log(f"int8 graph against fp32 torch on {len(x)} alerts: cosine mean {fid['cosine_mean']:.5f}, "
        f"1st percentile {fid['cosine_p1']:.5f}, min {fid['cosine_min']:.5f}{classes}")  # fmt: skip
    if fid["cosine_mean"] < MIN_COSINE_MEAN or fid.get("class_equal", 1.0) < MIN_CLASS_EQUAL:
        log("int8 graph below the fidelity targets: the runtime bundle stays float32")
        return runtime
    with_graph = dataclasses.replace(runtime, onnx_int8=graph, int8_fidelity=fid)
    check_z = RuntimeModel(with_graph, 1, int8=True).embed(check_inputs())
    return dataclasses.replace(with_graph, int8_check_z=check_z)


def export_int8(bundle_path: Path, runtime_path: Path, data: list[str], cfg: DistilConfig = DistilConfig()) -> RuntimeBundle:
    """Adds the int8 graph of a torch bundle to its runtime bundle (``trainer export`` and
    ``model/runtime_export.py`` write that), calibrated on the alerts of ``data``: ZTF's, or for
    an encoder without classes Rubin's."""
    bundle, runtime = load_bundle(bundle_path), load_runtime(runtime_path)
    if (runtime.name, runtime.version) != (bundle.name, bundle.version):
        raise ValueError(f"{runtime_path} is {runtime.name}:{runtime.version}, not the runtime bundle of "
                         f"{bundle_path} ({bundle.name}:{bundle.version})")  # fmt: skip
    if bundle.class_names:
        ds = load_dataset(data, {})
        x, features = ds.x, ds.features
    else:
        from trainer.rubin import load_rubin

        x = load_rubin(data).x
        features = np.zeros((len(x), 0), np.float32)
    result = with_int8(bundle, runtime, x, features, cfg)
    save_runtime(result, runtime_path)
    return result


def student_classifier(teacher: StampClassifier, student: Encoder) -> StampClassifier:
    out = copy.deepcopy(teacher)
    out.encoder.load_state_dict(student.state_dict())
    return out.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description="Adds the int8 graph of a torch bundle to its runtime bundle "
                                 "(python -m trainer.quantize model/bundles/default.pt model/bundles/default.npz "
                                 "--data ../shared/ztf/alerts)")  # fmt: skip
    ap.add_argument("bundle", type=Path)
    ap.add_argument("out", type=Path, help="its runtime bundle (python -m model.runtime_export makes one)")
    ap.add_argument("--data", nargs="+", required=True,
                    help="alerts to calibrate and distil on (files or folders; Rubin's for an encoder without classes)")
    ap.add_argument("--epochs", type=int, default=DistilConfig.epochs, help="0: equalisation alone")
    a = ap.parse_args()
    torch.manual_seed(0)
    rb = export_int8(a.bundle, a.out, a.data, DistilConfig(epochs=a.epochs))
    print(f"{a.out}: {rb.name}:{rb.version}, int8 graph {'included' if rb.onnx_int8 else 'NOT included'}")


if __name__ == "__main__":
    main()
