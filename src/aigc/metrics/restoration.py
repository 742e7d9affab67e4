"""Full-reference image quality: PSNR and SSIM of a restored image against the truth.

Both are computed per image on 8-bit pixels (the image a user would save), over every
channel, and averaged over images by the caller, as restoration and super-resolution
papers report them. SSIM is Wang et al. 2004 ("Image quality assessment: from error
visibility to structural similarity"): an 11x11 Gaussian window of sigma 1.5,
K1 = 0.01, K2 = 0.03, the local statistics over windows that lie wholly inside the
image (no padding), the map averaged per channel and the channels averaged: the
settings of scikit-image's ``structural_similarity(gaussian_weights=True, sigma=1.5,
use_sample_covariance=False, data_range=255)``, against which the tests check it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

DATA_RANGE = 255.0
PSNR_CAP = 100.0  # dB given to an image identical to its truth (an infinite PSNR)
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _as_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) uint8 (or float in [0, 255]) -> (N, C, H, W) float64."""
    x = torch.as_tensor(np.asarray(images) if not isinstance(images, torch.Tensor) else images)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4:
        raise ValueError(f"expected (N, H, W, C) images, got shape {tuple(x.shape)}")
    return x.to(torch.float64).permute(0, 3, 1, 2)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(images: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> np.ndarray:
    """Peak signal-to-noise ratio of each image against its truth, in dB: (N,) float64.

    10 log10(255^2 / MSE) with the MSE over all pixels and channels of one image;
    an exact copy (MSE 0) counts as PSNR_CAP dB so that averages stay finite.
    """
    a, b = _as_float(images), _as_float(truth)
    _check_pair(a, b)
    mse = ((a - b) ** 2).flatten(1).mean(1)
    out = 10.0 * torch.log10(DATA_RANGE**2 / mse.clamp_min(1e-300))
    return out.clamp(max=PSNR_CAP).numpy()


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian (size,) float64 whose outer product is SSIM's window."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    w = torch.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def ssim(images: np.ndarray | torch.Tensor, truth: np.ndarray | torch.Tensor) -> np.ndarray:
    """Mean structural similarity of each image against its truth: (N,) float64 in [-1, 1].

    SSIM(x, y) = (2 mu_x mu_y + C1)(2 sigma_xy + C2) / ((mu_x^2 + mu_y^2 + C1)(sigma_x^2 +
    sigma_y^2 + C2)) (Wang et al. 2004, eq. 13), with Gaussian-weighted local statistics
    (eq. 14-16), C1 = (K1 L)^2 and C2 = (K2 L)^2 for L = 255. Images must be at least
    11 pixels on a side.
    """
    a, b = _as_float(images), _as_float(truth)
    _check_pair(a, b)
    _, c, h, w = a.shape
    if min(h, w) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW}x{SSIM_WINDOW}, got {h}x{w}")
    g = gaussian_window()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, SSIM_WINDOW, SSIM_WINDOW)

    def blur(x: torch.Tensor) -> torch.Tensor:  # local Gaussian mean over valid windows
        return F.conv2d(x, kernel, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    smap = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    )
    return smap.flatten(2).mean(2).mean(1).numpy()
