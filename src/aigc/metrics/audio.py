"""Full-reference audio quality: scale-invariant signal-to-distortion ratio.

SI-SDR is Le Roux et al. 2019 ("SDR – half-baked or well done?"): the estimate is
split into the reference scaled by the least-squares factor alpha = <s', s> / <s, s>
(the target) and the rest (the distortion), and SI-SDR = 10 log10(|alpha s|^2 /
|alpha s - s'|^2). Rescaling the estimate does not change it; both signals are made
zero-mean first, as in the paper's reference code and the speech-enhancement papers
that report it.
"""

from __future__ import annotations

import numpy as np
import torch

SI_SDR_EPS = 1e-8  # keeps silence and perfect estimates finite


def si_sdr(estimate: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor) -> np.ndarray:
    """SI-SDR in dB of each estimate (..., T) against its reference (..., T): an array
    of the leading shape (a float for one pair of (T,) signals)."""
    est = torch.as_tensor(np.asarray(estimate) if not isinstance(estimate, torch.Tensor)
                          else estimate).double()  # fmt: skip
    ref = torch.as_tensor(np.asarray(reference) if not isinstance(reference, torch.Tensor)
                          else reference).double()  # fmt: skip
    if est.shape != ref.shape:
        raise ValueError(f"estimate {tuple(est.shape)} and reference {tuple(ref.shape)} differ")
    est = est - est.mean(-1, keepdim=True)
    ref = ref - ref.mean(-1, keepdim=True)
    alpha = (est * ref).sum(-1, keepdim=True) / ((ref * ref).sum(-1, keepdim=True) + SI_SDR_EPS)
    target = alpha * ref
    noise = target - est
    ratio = ((target * target).sum(-1) + SI_SDR_EPS) / ((noise * noise).sum(-1) + SI_SDR_EPS)
    return (10.0 * torch.log10(ratio)).numpy()
