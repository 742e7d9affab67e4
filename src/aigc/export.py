"""Export a trained GPT run to Hugging Face transformers and to ONNX.

Our GPT is GPT-2's architecture (learned positions, pre-norm blocks, fused q/k/v,
4x MLP, final LayerNorm, LM head tied to the token embedding), so a run becomes a
``GPT2LMHeadModel`` folder by renaming nothing and transposing the projection
matrices: GPT-2 keeps them in Conv1D's (in, out) layout where nn.Linear keeps
(out, in). Two settings make the mathematics identical: ``activation_function=
"gelu"`` (exact erf GELU, as ours; GPT-2's own "gelu_new" is the tanh
approximation) and zero biases where ours has none (GPT-2 always has them).

The char tokenizer becomes a ``tokenizers`` WordLevel model over single
characters (a pre-tokenizer splits text into code points, a Fuse decoder joins
them without spaces); byte-level BPE is already a ``tokenizers`` JSON. Either way
``PreTrainedTokenizerFast`` encodes text to exactly our ids.

transformers, onnx, onnxruntime and onnxscript are optional
(``pip install 'aigc[export]'``) and imported only here, on use.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn as nn
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from torch import Tensor

from aigc.data.tokenizers import EOS_TOKEN, BPETokenizer, CharTokenizer
from aigc.errors import AigcError, CheckpointError, RequestError
from aigc.models.gpt import GPT
from aigc.runs import RunDir

LAYER_NORM_EPS = 1e-5  # torch's nn.LayerNorm default, which our GPT uses


class MissingExtraError(AigcError, ImportError):
    """An optional package that exporting needs is not installed."""


def _require(module: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise MissingExtraError(
            f"exporting needs the {module!r} package, which is not installed: "
            "pip install 'aigc[export]'"
        ) from e


# ---------------------------------------------------------------------------
# Pure conversions: weights, config, tokenizer


def gpt2_state_dict(model: GPT) -> dict[str, Tensor]:
    """Our GPT's weights under Hugging Face GPT2LMHeadModel's names and layouts.

    Names are the same (transformer.wte, transformer.h.{i}.attn.c_attn, ...); the
    four projection matrices per block are transposed to Conv1D's (in, out); a
    missing bias becomes zeros; lm_head.weight is the token embedding (tied).
    """
    t = model.transformer
    state = {
        "transformer.wte.weight": t.wte.weight.detach().clone(),
        "transformer.wpe.weight": t.wpe.weight.detach().clone(),
    }

    def put(name: str, module: nn.Module) -> None:
        if type(module) not in (nn.Linear, nn.LayerNorm):  # e.g. an unmerged adapter
            raise TypeError(f"{name} is a {type(module).__name__}, not a plain Linear/LayerNorm")
        w = module.weight.detach()
        state[f"{name}.weight"] = w.t().contiguous() if type(module) is nn.Linear else w.clone()
        b = module.bias  # (out,) for Linear, (C,) for LayerNorm: w.shape[0] either way
        state[f"{name}.bias"] = w.new_zeros(w.shape[0]) if b is None else b.detach().clone()

    for i, block in enumerate(t.h):
        p = f"transformer.h.{i}"
        put(f"{p}.ln_1", block.ln_1)
        put(f"{p}.attn.c_attn", block.attn.c_attn)  # (C, 3C): q, k, v side by side, as ours
        put(f"{p}.attn.c_proj", block.attn.c_proj)
        put(f"{p}.ln_2", block.ln_2)
        put(f"{p}.mlp.c_fc", block.mlp.c_fc)  # (C, 4C)
        put(f"{p}.mlp.c_proj", block.mlp.c_proj)  # (4C, C)
    put("transformer.ln_f", t.ln_f)
    state["lm_head.weight"] = state["transformer.wte.weight"]  # tied
    return state


def gpt2_config_kwargs(model: GPT, eos_id: int | None) -> dict[str, Any]:
    """Keyword arguments of transformers.GPT2Config that describe our GPT exactly."""
    cfg = model.cfg
    return dict(
        vocab_size=cfg.vocab_size,
        n_positions=cfg.block_size,
        n_ctx=cfg.block_size,  # older transformers read the context length from here
        n_embd=cfg.n_embd,
        n_layer=cfg.n_layer,
        n_head=cfg.n_head,
        n_inner=4 * cfg.n_embd,
        activation_function="gelu",  # transformers' ACT2FN["gelu"] is the exact erf GELU
        layer_norm_epsilon=LAYER_NORM_EPS,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        summary_first_dropout=0.0,
        scale_attn_weights=True,  # scores / sqrt(head_dim), as scaled_dot_product_attention
        scale_attn_by_inverse_layer_idx=False,
        reorder_and_upcast_attn=False,
        tie_word_embeddings=True,
        # GPT-2 defaults these to 50256; ours is the BPE <|endoftext|> or none (char)
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        pad_token_id=eos_id,
    )


def char_tokenizer_to_hf(tokenizer: CharTokenizer) -> HFTokenizer:
    """A Hugging Face ``tokenizers`` Tokenizer giving exactly our char tokenizer's ids.

    WordLevel over the characters; the pre-tokenizer isolates every code point
    (newlines and spaces included, none dropped) and the Fuse decoder joins the
    tokens without separators. Like ours, it raises on a character outside the
    vocabulary (there is no unknown token).
    """
    vocab = {c: i for i, c in enumerate(tokenizer.chars)}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="[UNK]"))  # [UNK] not in vocab: errors
    hf.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    hf.decoder = decoders.Fuse()
    if tokenizer.specials:  # a chat run's markers: ids after the characters, in order
        hf.add_special_tokens(list(tokenizer.specials))
    return hf


# The chat template of aigc.data.chat.render, in the Jinja form transformers'
# apply_chat_template reads.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}<|end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def hf_tokenizer(tokenizer: CharTokenizer | BPETokenizer, block_size: int) -> Any:
    """Our tokenizer as a transformers PreTrainedTokenizerFast (needs transformers)."""
    transformers = _require("transformers")
    special: dict[str, Any] = {}
    if tokenizer.token_to_id("<|end|>") is not None:  # a chat run: its template, its stop
        special = dict(chat_template=CHAT_TEMPLATE, eos_token="<|end|>")
    if isinstance(tokenizer, CharTokenizer):
        backend = char_tokenizer_to_hf(tokenizer)
    else:
        backend = HFTokenizer.from_str(tokenizer.hf.to_str())
        if tokenizer.eos_id is not None:
            # GPT-2's convention: one token ends a text, starts an empty one and pads
            gpt2 = dict(bos_token=EOS_TOKEN, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN)
            special = {**gpt2, **special}  # a chat run's turn ends at <|end|>
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend,
        model_max_length=block_size,
        clean_up_tokenization_spaces=False,  # decode must give our text back unchanged
        padding_side="left",  # batched generation continues from the right end
        **special,
    )


# ---------------------------------------------------------------------------
# Run folders in, files out


def _gpt_run(run_dir: str | Path) -> RunDir:
    """The run folder; CheckpointError naming it and its family unless it is a GPT run."""
    run = RunDir(run_dir)
    family = run.info()["family"]
    if family not in ("gpt", "chat"):
        raise CheckpointError(
            f"{run.path} is a {family!r} run; only GPT language-model runs (families 'gpt' "
            "and 'chat') can be exported"
        )
    return run


def _check_output(out: Path, overwrite: bool, kind: str) -> None:
    if kind == "folder" and out.exists() and not out.is_dir():
        raise RequestError(f"{out} is a file; give a folder to export into")
    if kind == "file" and out.is_dir():
        raise RequestError(f"{out} is a folder; give the path of the .onnx file to write")
    occupied = any(out.iterdir()) if out.is_dir() else out.is_file() and out.stat().st_size > 0
    if occupied and not overwrite:
        raise RequestError(
            f"{out} already exists and is not empty; replace it with --overwrite (Python: "
            "overwrite=True), "
            "or choose another path"
        )


def export_hf(
    run_dir: str | Path,
    out_dir: str | Path,
    *,
    overwrite: bool = False,
    ema: bool | None = None,
) -> Path:
    """Write a GPT run as a Hugging Face transformers folder; returns ``out_dir``.

    ``AutoModelForCausalLM.from_pretrained(out_dir)`` gives a GPT2LMHeadModel with our
    logits, and ``AutoTokenizer.from_pretrained(out_dir)`` our token ids. The folder
    holds config.json, generation_config.json, model.safetensors, tokenizer.json and
    tokenizer_config.json. An existing non-empty folder is refused unless
    ``overwrite``, which replaces those files and leaves any others. ``ema`` as in
    :func:`aigc.load` (default: EMA weights when the run kept them).
    """
    from aigc.api import load

    run, out = _gpt_run(run_dir), Path(out_dir)
    _check_output(out, overwrite, "folder")
    transformers = _require("transformers")
    gen = load(run.path, device="cpu", ema=ema)
    model: GPT = gen.model
    eos_id = gen.tokenizer.eos_id
    if gen.is_chat:  # generation stops at the end of the assistant's turn
        eos_id = gen.tokenizer.token_to_id("<|end|>")

    config = transformers.GPT2Config(**gpt2_config_kwargs(model, eos_id))
    hf_model = transformers.GPT2LMHeadModel(config).to(model.lm_head.weight.dtype)
    hf_model.load_state_dict(gpt2_state_dict(model), strict=True)
    hf_model.eval()
    tokenizer = hf_tokenizer(gen.tokenizer, model.cfg.block_size)

    # Write beside the destination, then move the files in: a failure leaves no half export.
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        with _quiet_transformers(transformers):
            hf_model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        _portable_tokenizer_class(tmp / "tokenizer_config.json")
        out.mkdir(exist_ok=True)
        for f in sorted(tmp.iterdir()):
            os.replace(f, out / f.name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@contextlib.contextmanager
def _quiet_transformers(transformers: ModuleType) -> Iterator[None]:
    """No "Writing model shards" progress bar for a one-file save; restored afterwards."""
    log = transformers.utils.logging
    was_enabled = log.is_progress_bar_enabled()
    log.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            log.enable_progress_bar()


def _portable_tokenizer_class(path: Path) -> None:
    # transformers 5 writes its new name "TokenizersBackend", which 4.x does not
    # know; "PreTrainedTokenizerFast" is the same class in 5 and loads in both.
    doc = json.loads(path.read_text(encoding="utf-8"))
    doc["tokenizer_class"] = "PreTrainedTokenizerFast"
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


@contextlib.contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """Hide torch's own export chatter that is no concern of ours: "torchvision is not
    installed" (we use no torchvision ops) and its internal deprecation warnings."""
    logger = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.|copyreg")
            yield
    finally:
        logger.setLevel(level)


class _LogitsOnly(nn.Module):
    """forward(input_ids) -> logits, the signature the ONNX graph gets."""

    def __init__(self, model: GPT) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.model(input_ids)[0]


def export_onnx(
    run_dir: str | Path,
    out_path: str | Path,
    *,
    overwrite: bool = False,
    ema: bool | None = None,
) -> Path:
    """Write a GPT run's forward pass as one ONNX file; returns ``out_path``.

    The graph maps ``input_ids`` (batch, sequence) int64 to ``logits`` (batch,
    sequence, vocab) float32, with batch and sequence (1 to block_size) dynamic.
    Uses torch's torch.export-based exporter (which needs onnxscript); the weights
    go inside the file, so models over 2 GB are not supported. An existing
    non-empty file is refused unless ``overwrite``.
    """
    from aigc.api import load

    run, out = _gpt_run(run_dir), Path(out_path)
    _check_output(out, overwrite, "file")
    for module in ("onnx", "onnxscript"):  # the torch.export-based exporter needs both
        _require(module)
    gen = load(run.path, device="cpu", ema=ema)
    model: GPT = gen.model
    block = model.cfg.block_size

    wrapper = _LogitsOnly(model).eval()
    # batch 2 and a sequence of 2: example sizes of 1 would be specialised away
    example = torch.zeros(2, min(2, block), dtype=torch.long)
    sequence = torch.export.Dim("sequence", min=1, max=block) if block > 1 else None
    dynamic = {"input_ids": {0: torch.export.Dim("batch"), 1: sequence}}
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out.name}.export-", dir=out.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with torch.no_grad(), _quiet_onnx_exporter():
            torch.onnx.export(
                wrapper,
                (example,),
                str(tmp),
                input_names=["input_ids"],
                output_names=["logits"],
                dynamic_shapes=dynamic,
                dynamo=True,
                external_data=False,
                verbose=False,
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return out
