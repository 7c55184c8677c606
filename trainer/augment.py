"""Augmentations of the study, on torch batches: random flips / 90-180-270 rotations (the 8
symmetries of a square stamp) and optional tile shuffling. Input and reconstruction target are the
same augmented stamp."""

from __future__ import annotations

import torch


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each stamp of the batch gets one of the 8 flips/rotations, drawn uniformly."""
    k = torch.randint(0, 8, (x.shape[0],), generator=generator, device="cpu").to(x.device)
    out = torch.empty_like(x)
    for t in range(8):
        m = k == t
        if not bool(m.any()):
            continue
        v = torch.rot90(x[m], t // 2, dims=(2, 3))
        out[m] = torch.flip(v, dims=(3,)) if t % 2 else v
    return out


def tile_shuffle(x: torch.Tensor, grid: int = 3, p: float = 0.5, generator: torch.Generator | None = None) -> torch.Tensor:
    """With probability p per stamp, cut it into grid x grid tiles and permute them (both channels
    alike). 21 = 3 x 7, so the default grid tiles the stamp exactly."""
    n, c, h, w = x.shape
    th, tw = h // grid, w // grid
    if th * grid != h or tw * grid != w:
        raise ValueError(f"a {h}x{w} stamp does not split into {grid}x{grid} tiles")
    tiles = x.reshape(n, c, grid, th, grid, tw).permute(0, 2, 4, 1, 3, 5).reshape(n, grid * grid, c, th, tw)
    perm = torch.argsort(torch.rand(n, grid * grid, generator=generator), dim=1).to(x.device)
    keep = (torch.rand(n, generator=generator) >= p).to(x.device)
    perm[keep] = torch.arange(grid * grid, device=x.device)
    shuffled = torch.gather(tiles, 1, perm[:, :, None, None, None].expand_as(tiles))
    return shuffled.reshape(n, grid, grid, c, th, tw).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)


def augment(x: torch.Tensor, mode: str, grid: int = 3, generator: torch.Generator | None = None) -> torch.Tensor:
    if mode == "none":
        return x
    x = random_dihedral(x, generator)
    if mode == "flips_rotations_tiles":
        x = tile_shuffle(x, grid, generator=generator)
    return x
