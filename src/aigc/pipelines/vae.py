"""The VAE pipeline: an image generator that also encodes, so it reconstructs images,
traverses its latent units, and reports held-out likelihoods."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch

from aigc.errors import RequestError
from aigc.pipelines.base import EvalResult, ImageOutput, check_count
from aigc.pipelines.image import ImagePipeline, check_watermark, image_output


class VAEPipeline(ImagePipeline):
    """A trained VAE: what an ImagePipeline does, and reconstruct, traverse, and the
    negative ELBO and IWAE bound in evaluate."""

    verbs: ClassVar[frozenset[str]] = ImagePipeline.verbs | {"reconstruct", "traverse"}

    def evaluate(
        self,
        n: int | None = None,
        save: bool = True,
        iwae_k: int | None = None,
        metrics: Sequence[str] | None = None,
        against: str | None = None,
        inception_weights: str | None = None,
        fid_protocol: str | None = None,
        scheduler: str | None = None,
        steps: int | None = None,
        guidance: float | None = None,
    ) -> EvalResult:
        """As ImagePipeline.evaluate (``scheduler``, ``steps`` and ``guidance`` are
        RequestErrors), with the held-out likelihoods: the negative ELBO and
        the IWAE bound with ``iwae_k`` importance samples per image (default 1000), in
        nats per image and bits per dimension, the KL per latent unit and active units."""
        k = 1000 if iwae_k is None else iwae_k
        check_count(k, limit=100_000, what="iwae_k")
        self.task.iwae_k = k
        return super().evaluate(n, save, None, metrics, against, inception_weights, fid_protocol,
                                scheduler, steps, guidance)  # fmt: skip

    def format_eval(self, result: dict[str, Any]) -> str:
        kl_dims = {k for k in result if k.startswith("kl_dim/")}
        lines = [
            f"{self.run.path} at step {result['step']}",
            f"  held-out negative ELBO  {result['nelbo']:10.2f} nats/image  {result['bpd']:.4f} "
            "bits/dim",
            f"  IWAE bound, k={int(result['iwae_k']):<6} {result['iwae_nll']:10.2f} nats/image  "
            f"{result['iwae_bpd']:.4f} bits/dim",
            f"  reconstruction {result['recon']:.2f} + KL {result['kl']:.2f} nats; active latent "
            f"units {int(result['active_units'])} of {len(kl_dims)}",
        ]
        vae = {"nelbo", "bpd", "iwae_nll", "iwae_bpd", "recon", "kl", "active_units", "iwae_k"}
        return "\n".join(lines + self._judged_lines(result, frozenset(vae | kl_dims)))

    def reconstruct(self, source: str | None = None, n: int = 32, output: str = "tensor",
                    watermark: str | None = None) -> Any:  # fmt: skip
        """Originals and reconstructions (decoded posterior means) of ``n`` images, in rows
        of 8 that alternate: originals, then theirs. ``source`` None takes the run's held-out
        images; else a data source as in ``data.source`` (a folder, IDX or CIFAR file,
        digits, shapes), prepared like the run's own. VAE runs only. ``watermark``: a key
        that marks the reconstructions (not the originals)."""
        from aigc.tasks.images import to_model_batch

        check_count(n, limit=1000)
        check_watermark(watermark)
        labels = None
        if source is None:
            images, labels = self.task._val()
        else:
            images, found = self.task.load_like_run(source)
            if self.conditional:
                missing = [a for a in self.task.attributes if a not in found.labels]
                if missing:
                    raise RequestError(
                        f"{found.source} has no {missing[0]!r} labels, which this conditional "
                        "VAE needs to reconstruct"
                    )
                labels = np.stack([found.labels[a] for a in self.task.attributes], 1)
        images = images[:n]
        x = to_model_batch(images).to(self.device)
        y = None if labels is None else torch.from_numpy(np.asarray(labels[:n])).to(self.device)
        with torch.inference_mode():
            rec = self.model.reconstruct(x, y)
        rec = self.postprocess(ImageOutput(rec.cpu()), watermark).images.to(x.device)
        rows = [t for i in range(0, len(x), 8) for t in (x[i : i + 8], rec[i : i + 8])]
        return image_output(torch.cat(rows).cpu(), output)

    def traverse(
        self,
        steps: int = 8,
        span: float = 3.0,
        dims: list[int] | None = None,
        labels: Any = None,
        seed: int | None = None,
        output: str = "tensor",
        watermark: str | None = None,
    ) -> Any:
        """One row per latent dimension (default: all): that unit swept over ``steps``
        values in [-span, span] around a latent drawn from the seed, the others held.
        ``watermark``: a key that marks each image."""

        check_watermark(watermark)
        z_dim = self.model.cfg.z_dim
        dims = list(range(z_dim)) if dims is None else list(dims)
        if not 2 <= steps <= 64 or not dims or any(not 0 <= d < z_dim for d in dims):
            raise RequestError(f"traverse: steps in [2, 64] and dims in [0, {z_dim}) are needed")
        gen = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        z0 = self.model.sample_z(1, gen)[0].cpu()
        zs = self.model.traverse(z0, torch.linspace(-span, span, steps), dims)
        lab = self._labels_drawn(1, labels, gen)
        if lab is not None:
            lab = lab.expand(len(zs), -1).to(self.device)
        with torch.inference_mode():
            images = self.model.generate(zs.to(self.device), lab)
        out = self.postprocess(ImageOutput(images.cpu(), None, seed), watermark)
        return image_output(out.images, output)
