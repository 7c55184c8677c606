"""The architecture's description, free of torch so that configs and tools can read it cheaply:
the trainer's config embeds it, bundles and run folders record it, ``model/autoencoder.py`` builds
from it."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal


@dataclass(frozen=True)
class AutoencoderConfig:
    kind: Literal["ae", "vae"] = "ae"
    latent_dim: int = 42
    # Conv channels of the encoder's two stages (the decoder mirrors them). The inference cost
    # grows with their square: (16, 32) costs a quarter of (32, 64) (docs/model.md).
    channels: tuple[int, int] = (32, 64)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["channels"] = list(self.channels)
        return d

    @staticmethod
    def from_dict(d: dict[str, Any]) -> AutoencoderConfig:
        kind = str(d["kind"])
        if kind not in ("ae", "vae"):
            raise ValueError(f"unknown autoencoder kind {kind!r}")
        c1, c2 = (int(c) for c in d.get("channels", (32, 64)))
        return AutoencoderConfig(kind="vae" if kind == "vae" else "ae", latent_dim=int(d["latent_dim"]), channels=(c1, c2))
