"""VAEs on images: prepared image data + the VAE family, as the trainer and loaders see it.

Evaluation reports honest likelihoods on the held-out split: the negative ELBO and
the importance-weighted bound on -log p(x) (IWAE, Burda et al. 2016) in nats per
image and bits per dimension, the KL term, and the number of active latent units;
for labelled data, the domain classifier's verdict on prior samples too (ImageTask).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import nn

from aigc.errors import ConfigError
from aigc.models.vae import VAE, VAEConfig
from aigc.tasks.images import ImageTask, open_data, to_model_batch
from aigc.trainer import mix_seed


class VAETask(ImageTask):
    """Trains a VAE on a run's images; evaluates likelihoods and samples."""

    name = "vae"
    model_config = VAEConfig
    model_class = VAE
    pipeline_class = "aigc.pipelines.vae:VAEPipeline"
    headline_metric = "nelbo"
    loss_keys = frozenset({"loss", "elbo", "nelbo", "recon", "kl"})
    iwae_k = 64  # importance samples per held-out image in evaluations (evaluate() may raise it)
    eval_batch = 128

    @classmethod
    def check_data_fit(cls, config: Any, meta: dict[str, Any]) -> None:
        """A Bernoulli likelihood is a probability of binary pixels only: on grey levels its
        'NLL' is a reconstruction loss, not a likelihood, so such a run is refused."""
        if config.model.likelihood == "bernoulli" and not meta.get("binary", True):
            raise ConfigError(
                f"model.likelihood=bernoulli models binary pixels, but {meta['source']} has grey "
                "levels: set data.binarize=true (threshold at half), or use "
                "model.likelihood=discretized_logistic for 8-bit images"
            )

    def _val(self) -> tuple[np.ndarray, np.ndarray | None]:
        data = self.data or open_data(self.run.data_dir)
        labels = data.split_labels("val")
        if not self.attributes:
            labels = None
        return data.val_images, labels

    def eval_sums(
        self, model: nn.Module, rank: int, world: int, device: torch.device
    ) -> dict[str, float]:
        """Summed negative ELBO, IWAE bound, reconstruction, KL and posterior-mean moments
        over this rank's share of the held-out images, plus the classifier's counts."""
        images, labels = self._val()
        idx = np.arange(rank, len(images), world)
        z = model.cfg.z_dim
        sums: dict[str, float] = {"count": float(len(idx))}
        for k in ("nelbo", "recon", "kl", "iwae"):
            sums[k] = 0.0
        mu_sum = torch.zeros(z, dtype=torch.float64)
        mu_sq = torch.zeros(z, dtype=torch.float64)
        kl_sum = torch.zeros(z, dtype=torch.float64)
        seed = self.config.train.seed
        # seeded per batch and per estimate: the same held-out numbers whenever this runs,
        # and the ELBO's noise does not depend on how many samples the IWAE bound draws
        with torch.random.fork_rng(devices=[]):
            for i in range(0, len(idx), self.eval_batch):
                part = idx[i : i + self.eval_batch]
                x = to_model_batch(images[part]).to(device)
                y = None if labels is None else torch.from_numpy(labels[part]).to(device)
                torch.manual_seed(mix_seed(seed, rank, i, 0))
                terms = model.elbo_terms(x, y)
                for k in ("nelbo", "recon", "kl"):
                    sums[k] += float(terms[k].double().sum())
                torch.manual_seed(mix_seed(seed, rank, i, 1))
                sums["iwae"] += float(model.iwae_nll(x, y, self.iwae_k).double().sum())
                mu = terms["mu"].double()
                mu_sum += mu.sum(0).cpu()
                mu_sq += (mu**2).sum(0).cpu()
                kl_sum += terms["kl_dims"].double().sum(0).cpu()
        for u in range(z):
            sums[f"mu/{u}"] = float(mu_sum[u])
            sums[f"mu2/{u}"] = float(mu_sq[u])
            sums[f"kl_dim/{u}"] = float(kl_sum[u])
        return {**sums, **self.judge_sums(model, rank, world, device)}

    def eval_metrics(self, sums: dict[str, float]) -> dict[str, float]:
        """nelbo and iwae_nll in nats per image with their bits per dimension, recon, kl,
        kl_dim/u (each latent unit's KL), active_units (Var over images of E_q[z_u] > 0.01),
        iwae_k; classifier metrics."""
        n = sums.get("count", 0.0)
        if not n:
            return self.judge_metrics(sums)
        dims = self.model.num_dims * math.log(2)
        z = self.config.model.z_dim
        mean = np.array([sums[f"mu/{u}"] for u in range(z)]) / n
        var = np.array([sums[f"mu2/{u}"] for u in range(z)]) / n - mean**2
        out = {
            "nelbo": sums["nelbo"] / n,
            "bpd": sums["nelbo"] / n / dims,
            "iwae_nll": sums["iwae"] / n,
            "iwae_bpd": sums["iwae"] / n / dims,
            "recon": sums["recon"] / n,
            "kl": sums["kl"] / n,
            "active_units": float((var > 0.01).sum()),
            "iwae_k": float(self.iwae_k),
        }
        out.update({f"kl_dim/{u}": sums[f"kl_dim/{u}"] / n for u in range(z)})
        return {**out, **self.judge_metrics(sums)}

    def samples(self, model: nn.Module, step: int, device: torch.device) -> dict[str, Any]:
        """Prior samples from fixed noise, and reconstructions of fixed held-out images
        (rows alternate: originals, then their reconstructions)."""
        from aigc.data.images import image_grid, to_uint8

        out = super().samples(model, step, device)
        images, labels = self._val()
        n = min(32, len(images))
        x = to_model_batch(images[:n]).to(device)
        y = None if labels is None else torch.from_numpy(labels[:n]).to(device)
        with torch.no_grad():
            rec = model.reconstruct(x, y)
        rows = [t for i in range(0, n, 8) for t in (x[i : i + 8], rec[i : i + 8])]
        out["reconstructions"] = image_grid(to_uint8(torch.cat(rows).cpu()), nrow=8)
        return out
