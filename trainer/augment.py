"""Augmentations of the study, on torch batches: random flips / 90-180-270 rotations (the 8
symmetries of a square stamp) and optional tile shuffling. Input and reconstruction target are the
same augmented stamp."""

from __future__ import annotations

import torch

from model.autoencoder import dihedral_views


def random_dihedral(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each stamp of the batch gets one of the 8 flips/rotations, drawn uniformly.

    All 8 views are computed and each stamp's is gathered: no data-dependent branch, so on a GPU
    no host synchronisation per view (a per-view ``mask.any()`` cost 8 syncs per batch)."""
    k = torch.randint(0, 8, (x.shape[0],), generator=generator, device="cpu").to(x.device)
    views = torch.stack(dihedral_views(x))  # (8, N, C, H, W): view t = rot90^(t // 2), flipped if t odd
    return views[k, torch.arange(x.shape[0], device=x.device)]


def random_shift(x: torch.Tensor, max_shift: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each stamp moved by up to ``max_shift`` pixels in each direction (drawn uniformly), edges
    repeated: a centroid off by a pixel or two, as a second view for the contrastive objective."""
    if max_shift <= 0:
        return x
    n, c, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4, mode="replicate")
    d = torch.randint(0, 2 * max_shift + 1, (2, n), generator=generator, device="cpu").to(x.device)
    rows = (torch.arange(h, device=x.device)[None, :] + d[0][:, None])[:, None, :, None]
    cols = (torch.arange(w, device=x.device)[None, :] + d[1][:, None])[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(c, device=x.device)[None, :, None, None]
    return padded[batch, chan, rows, cols]


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
