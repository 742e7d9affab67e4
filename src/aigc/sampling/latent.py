"""Latent samplers: images from a latent-variable model's prior (a GAN, a VAE).

A model the sampler can draw from has `cfg.z_dim` (its latent is z ~ N(0, I) of
shape (z_dim,)), `cfg.conditional` with `cfg.num_classes` (classes per attribute),
`sample_z` and `random_labels` (models.layers.LatentSampling) and
`generate(z, labels) -> images`. The task's evaluation and samples during training,
the Python API and the server all draw through `sample_images`, so a seed gives the
same images everywhere.
"""

from __future__ import annotations

from typing import Any

import torch

from aigc.trainer import mix_seed


def sample_images(
    model: Any,
    n: int,
    labels: torch.Tensor | None,
    seed: int | None,
    device: torch.device,
    batch_size: int = 500,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """n images (n, C, H, W) in [-1, 1] and the labels they were asked for.

    labels (n, A) long, or None: a conditional model then draws every label at
    random, and entries of -1 are drawn at random too. With a seed, image i's noise
    and random labels come from a generator seeded by (seed, i) alone, so image i
    is the same whatever n and the batch size are.
    """
    z, drawn = draw_latents(model, n, seed)
    if model.cfg.conditional:
        labels = drawn if labels is None else torch.where(labels < 0, drawn, labels)
    else:
        labels = None
    out = []
    for i in range(0, n, batch_size):
        lab = None if labels is None else labels[i : i + batch_size].to(device)
        out.append(model.generate(z[i : i + batch_size].to(device), lab))
    images = torch.cat(out) if out else torch.zeros(0)
    return images, labels


def draw_latents(model: Any, n: int, seed: int | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Noise (n, z_dim) and random labels (n, A) (None if unconditional), on the CPU."""
    conditional = model.cfg.conditional
    if seed is None:
        z = model.sample_z(n).cpu()
        return z, model.random_labels(n).cpu() if conditional else None
    zs, labels = [], []
    for i in range(n):
        gen = torch.Generator().manual_seed(mix_seed(seed, i))
        zs.append(torch.randn(1, model.cfg.z_dim, generator=gen))
        if conditional:
            labels.append(torch.stack([torch.randint(k, (1,), generator=gen)
                                       for k in model.cfg.num_classes], 1))  # fmt: skip
    return torch.cat(zs), torch.cat(labels) if conditional else None
