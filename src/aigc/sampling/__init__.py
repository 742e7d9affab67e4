"""Samplers: how a trained model's outputs are drawn.

    text.py      text decoding: SamplingParams, the logit processors (repetition
                 penalty, top-k, top-p, choose_next), generate / stream / stream_batch,
                 prompt encoding and incremental detokenization
    batching.py  continuous batching: BatchDecoder, which every text decoding runs on,
                 and DecodeEvent, what a step did for a row
    latent.py    latent samplers for GAN and VAE: sample_images

The text names are re-exported here. The latent sampler is imported from
aigc.sampling.latent, so that text decoding loads nothing of training.
"""

from aigc.sampling.batching import BatchDecoder, DecodeEvent
from aigc.sampling.text import (
    SamplingParams,
    TokenizerLike,
    apply_repetition_penalty,
    choose_next,
    encode_prompt,
    generate,
    stream,
    stream_batch,
    top_k_filter,
    top_p_filter,
)

__all__ = [
    "BatchDecoder",
    "DecodeEvent",
    "SamplingParams",
    "TokenizerLike",
    "apply_repetition_penalty",
    "choose_next",
    "encode_prompt",
    "generate",
    "stream",
    "stream_batch",
    "top_k_filter",
    "top_p_filter",
]
