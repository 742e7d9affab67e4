"""The `aigc` command line: a thin Typer app over aigc.api.

It parses arguments, calls the Python API and maps user mistakes (AigcError) to
a one- or two-line message and exit code 2. A traceback means a bug.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Annotated, Any

import typer

from aigc.config import RECIPES_DIR, shipped_recipe
from aigc.errors import AigcError, RequestError, TrainingInterrupted

app = typer.Typer(
    name="aigc",
    help="Train, evaluate, sample and serve generative models on your own data.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _q(path: object) -> str:
    """A path as a shell word for the `next:` hints (quoted when it holds spaces or quotes)."""
    import shlex

    return shlex.quote(str(path))


@contextlib.contextmanager
def _says_where_it_stopped() -> Iterator[None]:
    """Ctrl-C during training: the trainer saved a checkpoint; say where, and how to go on.
    (Typer turns a KeyboardInterrupt into a silent exit 130, so it is caught here.)"""
    try:
        yield
    except TrainingInterrupted as e:
        saved = f"saved {e.checkpoint}" if e.checkpoint else "nothing new to save"
        typer.echo(f"\ninterrupted at step {e.step:,}; {saved}\n"
                   f"continue with: aigc train {_q(e.run_dir)}", err=True)  # fmt: skip
        raise typer.Exit(130) from None


_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|[ntr\\])")


def unescape(text: str) -> str:
    """Backslash escapes typed on a command line (\\n, \\t, \\r, \\uXXXX, \\\\) as the
    characters they name; any other backslash stays as typed."""

    def one(m: re.Match) -> str:
        code = m.group(1)
        return chr(int(code[1:], 16)) if code[0] == "u" else {"n": "\n", "t": "\t", "r": "\r",
                                                               "\\": "\\"}[code]  # fmt: skip

    return _ESCAPE.sub(one, text)


def resolve_recipe(name: str) -> tuple[Path | None, Path | None]:
    """Returns (recipe file, None) or (None, run folder) for a CLI argument.

    Accepts a YAML path, a run folder (to continue it) or the name of a recipe
    that ships with aigc (``gpt-pydoc-char``).
    """
    p = Path(name)
    if p.is_dir() and (p / "run.json").is_file():
        return None, p
    if p.is_file():
        return p, None
    if (shipped := shipped_recipe(name)) is not None:
        return shipped, None
    known = ", ".join(sorted(f.stem for f in RECIPES_DIR.glob("*.yaml")))
    from aigc.errors import ConfigError

    raise ConfigError(f"{name!r} is not a config file, a run folder or a known recipe ({known})")


def _next_free(base: Path) -> Path:
    if not base.exists():
        return base
    i = 2
    while Path(f"{base}-{i}").exists():
        i += 1
    return Path(f"{base}-{i}")


@app.command()
def quickstart(
    minutes: Annotated[float, typer.Option(help="Training budget of the GPT in minutes.")] = 2.0,
    image_minutes: Annotated[
        float, typer.Option(help="Training budget of the DCGAN in minutes (0 skips it).")
    ] = 1.5,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run folder (default: runs/quickstart, numbered if taken).")
    ] = None,
) -> None:
    """Pretrain a small character-level GPT on the embedded Python docs and sample from it,
    then train a DCGAN on the embedded digits and save a grid of its images."""
    import aigc

    recipe = RECIPES_DIR / "gpt-pydoc-char.yaml"
    target = run_dir or _next_free(Path("runs") / "quickstart")
    typer.echo(f"aigc quickstart: training {recipe.name} for {minutes:g} min into {target}/")
    outcome = aigc.train(recipe, [f"train.max_time={minutes * 60}"], run_dir=target)
    gen = aigc.load(outcome.run_dir)
    m = outcome.metrics
    typer.echo(
        f"\ntrained {outcome.step} steps in {outcome.train_time:.0f} s; "
        f"validation loss {m.get('loss', float('nan')):.3f} nats/char "
        f"({m.get('bpc', float('nan')):.3f} bits/char, perplexity {m.get('ppl', float('nan')):.2f})"
    )
    for prompt in ("The for statement", "Exceptions are"):
        typer.echo(f"\n--- sample (prompt {prompt!r}) ---\n{prompt}", nl=False)
        for piece in gen.stream(prompt, max_new_tokens=300, temperature=0.8, seed=0):
            typer.echo(piece, nl=False)
        typer.echo()
    typer.echo(
        f"\nThe run folder is {outcome.run_dir}/ (weights, config, metrics.jsonl, TensorBoard in tb/).\n"
        "Try next:\n"
        f'  aigc sample {_q(outcome.run_dir)} --prompt "Lists are"\n'
        f"  aigc eval {_q(outcome.run_dir)}\n"
        f"  tensorboard --logdir {_q(f'{outcome.run_dir}/tb')}\n"
        "  aigc train gpt-pydoc-char data.path=my_corpus/ --run-dir runs/mine   # your own text"
    )
    if image_minutes > 0:
        _quickstart_images(image_minutes, Path(f"{target}-dcgan"))


def _quickstart_images(minutes: float, target: Path) -> None:
    import aigc

    target = _next_free(target)
    recipe = RECIPES_DIR / "dcgan-digits.yaml"
    typer.echo(
        f"\naigc quickstart, part 2: training {recipe.name} for {minutes:g} min into {target}/"
    )
    outcome = aigc.train(recipe, [f"train.max_time={minutes * 60}"], run_dir=target)
    gen = aigc.load(outcome.run_dir)
    grid = Path(outcome.run_dir) / "samples" / "quickstart.png"
    gen.save(gen.generate(64, seed=0), grid)
    m = outcome.metrics
    line = f"\ntrained {outcome.step} steps in {outcome.train_time:.0f} s"
    if m.get("min_class_share", 0) > 0:
        line += (f"; every digit drawn: the rarest is {100 * m['min_class_share']:.1f}% of "
                 f"samples, judged by a classifier trained on real digits")  # fmt: skip
    elif "classes_seen" in m:
        line += f"; {100 * m['classes_seen']:.0f}% of the digits drawn so far (train longer)"
    typer.echo(line)
    typer.echo(
        f"64 generated digits: {grid}\n"
        "Try next:\n"
        f"  aigc sample {_q(outcome.run_dir)} --n 64 --out digits.png --seed 1\n"
        f"  aigc sample {_q(outcome.run_dir)} --interpolate 8 --out walk.png\n"
        "  aigc train cgan-digits      # a conditional GAN: aigc sample runs/cgan-digits --class 7"
    )
    typer.echo(
        "\nAudio:\n"
        "  aigc train music-chorales   # Bach chorales; aigc sample runs/music-chorales --out pieces/\n"
        "  aigc train denoise-speech   # a speech denoiser; aigc denoise runs/denoise-speech "
        "--audio noisy.wav\n"
        "  aigc train spoken-digits    # spoken digits; aigc sample runs/spoken-digits --class seven "
        "--out sevens/\n"
        "  aigc train tts-digits       # text to speech; aigc speak runs/tts-digits --text '4 2 7'"
    )


@app.command(context_settings={"allow_extra_args": False})
def train(
    recipe: Annotated[
        str, typer.Argument(help="A YAML recipe, a recipe name, or a run folder to continue.")
    ],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted overrides such as train.max_steps=2000 model.n_layer=6."),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="Run folder (default: runs/<recipe name>).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Insist on continuing an existing run from its last checkpoint.")
    ] = False,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Train a model into a run folder; training into an existing run continues it."""
    import aigc

    path, existing = resolve_recipe(recipe)
    if existing is not None:
        if run_dir is not None and run_dir.resolve() != existing.resolve():
            raise RequestError(f"{recipe} is a run folder; leave out --run-dir to continue it")
        with _says_where_it_stopped():
            outcome = aigc.train(
                None, overrides or [], run_dir=existing, resume=True, progress=not quiet
            )
    else:
        with _says_where_it_stopped():
            outcome = aigc.train(
                path, overrides or [], run_dir=run_dir, resume=resume, progress=not quiet
            )
    _report(outcome)


def _report(outcome) -> None:
    m = outcome.metrics
    if outcome.resumed_from and outcome.step == outcome.resumed_from:
        typer.echo(
            f"{outcome.run_dir} is already trained to step {outcome.step}; "
            "raise train.max_steps or train.max_time to train further"
        )
        return
    from aigc.runs import RunDir
    from aigc.tasks import get_task

    task = get_task(RunDir(outcome.run_dir).info()["family"])
    line = f"done: step {outcome.step}, {outcome.train_time:.0f} s of training"
    key = outcome.headline or task.headline_metric
    if key in m:  # the headline, then the next two the task reports
        more = [(k, v) for k, v in m.items() if k != key][:2]
        line += f", validation {key} {m[key]:.4f}"
        line += f" ({', '.join(f'{k} {v:.3f}' for k, v in more)})" if more else ""
    typer.echo(line)
    hint = f"aigc {task.sample_verb} {_q(outcome.run_dir)} {task.sample_hint}".rstrip()
    typer.echo(f"run folder: {outcome.run_dir}/   next: {hint}")


@app.command()
def sample(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", "-p", help="Prompt; repeat for a batch.")
    ] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Tokens to generate per prompt.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.8,
    top_k: Annotated[int | None, typer.Option(help="Keep the k most likely tokens.")] = None,
    top_p: Annotated[
        float | None, typer.Option(help="Nucleus sampling: keep this much probability.")
    ] = None,
    repetition_penalty: Annotated[float, typer.Option(help="Above 1 discourages repeats.")] = 1.0,
    stop: Annotated[
        list[str] | None,
        typer.Option(
            help="Stop when this text appears; repeatable. Escapes \\n, \\t, \\r, \\uXXXX "
            "and \\\\ (a backslash) are understood, so --stop '\\n\\n' stops at a blank line."
        ),
    ] = None,
    seed: Annotated[
        int | None, typer.Option(help="Same seed and settings give the same text.")
    ] = None,
    stream: Annotated[bool, typer.Option(help="Print tokens as they are generated.")] = True,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    n: Annotated[
        int | None,
        typer.Option(
            "--n",
            help="Image runs: how many images [64]; music: pieces [4]; spoken: clips [64]; "
            "text: completions per prompt [1].",
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Text runs: a .jsonl file of samples; image runs: a grid .png, or a folder "
            "for one PNG per image; music runs: a "
            "folder for a .mid and a .wav per piece; spoken runs: a folder for a .wav per clip."
        ),
    ] = None,
    bars: Annotated[int, typer.Option(help="Music runs: bars of 4/4 per piece.")] = 8,
    class_: Annotated[
        str | None, typer.Option("--class", help="Image runs: the class to draw (name or index).")
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(help="Image runs: attribute=value, e.g. --label colour=red; repeatable."),
    ] = None,
    interpolate: Annotated[
        int | None,
        typer.Option(help="Image runs: strips of this many images between random latent points."),
    ] = None,
    reconstruct: Annotated[
        str | None,
        typer.Option(help="VAE runs: reconstruct 'held-out' images, or a folder/dataset."),
    ] = None,
    traverse: Annotated[
        bool, typer.Option(help="VAE runs: vary one latent dimension at a time, a row each.")
    ] = False,
    negative_prompt: Annotated[
        str | None, typer.Option(help="Text-to-image runs: what the images should not show.")
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Diffusion runs: denoising steps (default: the run's).")
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Diffusion runs: ddpm, ddim, euler, heun or dpm++2m (default: the run's)."
        ),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(help="Diffusion runs: classifier-free guidance scale; 1 = none."),
    ] = None,
    watermark_key: Annotated[
        str | None,
        typer.Option(help="Watermark the samples with this key (text, image and audio runs)."),
    ] = None,
    sign_key: Annotated[
        Path | None,
        typer.Option(help="Image runs: sign each file's provenance with this Ed25519 key (PEM)."),
    ] = None,
) -> None:
    """Generate from a trained run: text streams to the terminal (or --out FILE.jsonl with
    --n per prompt), images go to --out."""
    import aigc

    gen = aigc.load(run, device=device)
    if gen.kind == "classify":
        raise RequestError(f"{run} is a classifier; use: aigc classify {_q(run)} --text '...'")
    if gen.kind == "restore":
        raise RequestError(f"{run} restores images; use: aigc restore {_q(run)} --image FILE")
    if gen.kind == "translate":
        raise RequestError(f"{run} translates images; use: aigc translate {_q(run)} --image FILE")
    if watermark_key is not None and gen.kind not in ("text", "image", "music", "spoken"):
        raise RequestError(f"--watermark-key is for text, image and audio runs; {run} is a "
                           f"{gen.kind} run")  # fmt: skip
    signer = None
    if sign_key is not None:
        if gen.kind != "image":
            raise RequestError(f"--sign-key is for image runs; {run} is a {gen.kind} run")
        from aigc.safety.provenance import load_private_key

        signer = load_private_key(sign_key)
    if gen.kind == "music":
        if prompt:
            raise RequestError(f"{run} composes music from nothing; it takes no --prompt")
        result = gen.generate(4 if n is None else n, bars=bars, temperature=temperature,
                              top_k=top_k, seed=seed, watermark=watermark_key)  # fmt: skip
        folder = out or Path(run) / "samples" / "composed"
        if folder.suffix:
            raise RequestError(f"--out {folder}: give a folder; each piece is written as a "
                               ".mid and a .wav in it")  # fmt: skip
        paths = result.audio().save(folder)
        typer.echo(f"wrote {len(paths)} piece{'s' if len(paths) != 1 else ''} of {bars} bars "
                   f"to {folder}/ (NNNNN.mid and NNNNN.wav)")  # fmt: skip
        return
    text_n = n  # text runs: completions per prompt, when given
    n = 64 if n is None else n
    diffusion = {"negative_prompt": negative_prompt, "num_inference_steps": steps,
                 "scheduler": scheduler, "guidance_scale": guidance}  # fmt: skip
    if gen.kind == "spoken":
        if prompt or reconstruct is not None or traverse or interpolate is not None:
            raise RequestError(f"{run} says spoken words; it takes --class (a digit, or a class "
                               "of its audio folder), --n, --seed and the sampler options")  # fmt: skip
        _sample_spoken(gen, run, n, out, class_, label or [], seed, diffusion, watermark_key)
        return
    if "diffuse" in gen.verbs:
        if reconstruct is not None or traverse or interpolate is not None:
            raise RequestError(f"{run} is a diffusion run; it takes --prompt or --class, not "
                               "--reconstruct, --traverse or --interpolate")  # fmt: skip
        _sample_diffusion(gen, run, n, out, prompt or [], class_, label or [], seed, diffusion,
                          watermark_key, signer)  # fmt: skip
        return
    given = [k for k, v in diffusion.items() if v is not None]
    if given:
        flag = "--" + given[0].replace("num_inference_steps", "steps").replace("_scale", "")
        raise RequestError(f"{flag.replace('_', '-')} is for diffusion runs; {run} is not one")
    if gen.kind == "image":
        if prompt:
            raise RequestError(f"{run} is an image model; --prompt is for text models")
        if reconstruct is not None or traverse:
            verb = "reconstruct" if reconstruct is not None else "traverse"
            if verb not in gen.verbs:
                raise RequestError(
                    f"{run} is a {gen.config.family} run; only VAE runs take --{verb}"
                )
            if reconstruct is not None:
                source = None if reconstruct == "held-out" else reconstruct
                images = gen.reconstruct(source, n=min(n, 1000), watermark=watermark_key)
                name, asked = "reconstructions.png", {"reconstruct": reconstruct, "n": n}
            else:
                wanted = ([class_] if class_ is not None else []) + list(label or [])
                images = gen.traverse(labels=wanted or None, seed=seed, watermark=watermark_key)
                name, asked = "traversal.png", {"traverse": True, "labels": wanted, "seed": seed}
            paths = gen.save(images, out or Path(run) / "samples" / name, nrow=8)
            typer.echo(f"wrote {len(images)} images to {paths[0] if len(paths) == 1 else out}")
            _sign(gen, paths, signer, asked, watermark_key)
            return
        _sample_images(gen, run, n, out, class_, label or [], interpolate, seed, watermark_key,
                       signer)  # fmt: skip
        return
    prompts = prompt or [""]
    kw = dict(
        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, stop=tuple(unescape(s) for s in stop or ()),
        seed=seed, watermark=watermark_key,
    )  # fmt: skip
    if out is not None or text_n is not None:
        _sample_texts(gen, prompts, 1 if text_n is None else text_n, out, kw)
        return
    if len(prompts) == 1 and stream:
        pieces = gen.stream(prompts[0], **kw)  # checks the request before printing anything
        typer.echo(prompts[0], nl=False)
        for piece in pieces:
            typer.echo(piece, nl=False)
        typer.echo()
        return
    outs = gen.generate(prompts, **kw)
    for i, (p, o) in enumerate(zip(prompts, outs, strict=True)):
        if len(prompts) > 1:
            typer.echo(f"--- {i} ---")
        typer.echo(p + o)


@app.command()
def edit(
    run: Annotated[Path, typer.Argument(help="A diffusion run folder.")],
    image: Annotated[Path, typer.Option(help="The image to edit (PNG, JPEG, WebP, BMP, GIF).")],
    mask: Annotated[
        Path | None,
        typer.Option(
            help="Inpaint this region: transparent pixels (OpenAI's convention) or white ones "
            "in a black-and-white mask. Left out: the image's own transparent pixels, or "
            "image-to-image when it has none."
        ),
    ] = None,
    strength: Annotated[
        float | None,
        typer.Option(
            help="Image-to-image (no mask): how much of the denoising the image goes "
            "through, in (0, 1]; small keeps it, 1 keeps almost nothing [0.6]."
        ),
    ] = None,
    prompt: Annotated[
        str | None, typer.Option("--prompt", "-p", help="Text-to-image runs: what to draw.")
    ] = None,
    negative_prompt: Annotated[
        str | None, typer.Option(help="Text-to-image runs: what the images should not show.")
    ] = None,
    class_: Annotated[
        str | None, typer.Option("--class", help="Class-conditional runs: the class to draw.")
    ] = None,
    label: Annotated[
        list[str] | None,
        typer.Option(help="Class-conditional runs: attribute=value; repeatable."),
    ] = None,
    n: Annotated[int, typer.Option("--n", help="How many edits of the image.")] = 1,
    steps: Annotated[
        int | None,
        typer.Option(help="Denoising steps [inpainting: 50; image-to-image: the run's]."),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="ddpm, ddim, euler, heun or dpm++2m [inpainting: ddpm; else the run's]."),
    ] = None,
    guidance: Annotated[
        float | None, typer.Option(help="Classifier-free guidance scale [the run's].")
    ] = None,
    jump_length: Annotated[
        int, typer.Option(help="Inpainting (RePaint): steps per jump back in time.")
    ] = 5,
    resample: Annotated[
        int | None,
        typer.Option(help="Inpainting (RePaint): walks per stretch [1]; more needs ddpm/ddim."),
    ] = None,
    reconstruction: Annotated[
        float | None,
        typer.Option(
            help="Inpainting: reconstruction guidance weight [16 with ddpm/ddim, else 0]."
        ),
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed and settings, same images.")] = None,
    out: Annotated[
        Path | None, typer.Option(help="A grid .png, or a folder for one PNG per image.")
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Edit an image with a diffusion run: fill a masked region (inpainting, RePaint), or
    redraw the whole image from a noised copy (image-to-image, SDEdit)."""

    import aigc

    if not image.is_file():
        raise RequestError(f"--image {image}: no such file")
    if mask is not None and not mask.is_file():
        raise RequestError(f"--mask {mask}: no such file")
    gen = aigc.load(run, device=device)
    if "edit" not in gen.verbs:
        raise RequestError(f"{run} is a {gen.config.family} run; aigc edit takes diffusion runs")
    labels: list = ([class_] if class_ is not None else []) + list(label or [])
    common = {"prompt": prompt, "negative_prompt": negative_prompt, "n": n,
              "labels": labels or None, "num_inference_steps": steps, "scheduler": scheduler,
              "guidance_scale": guidance, "seed": seed}  # fmt: skip
    kind = gen.edit_kind(image, mask, strength)
    with _denoising_bar() as advance:
        result = gen.edit(image, mask, strength, jump_length=jump_length, resample=resample,
                          reconstruction=reconstruction, callback=advance, **common)  # fmt: skip
    target = out or Path(run) / "samples" / f"{kind}.png"
    paths = gen.save(result.images, target)
    where = paths[0] if len(paths) == 1 else f"{target}/ ({len(paths)} PNG files)"
    what = "inpainted" if kind == "inpaint" else "image-to-image"
    k = len(result.images)
    typer.echo(f"wrote {k} {what} image{'s' if k != 1 else ''} to {where}")


def _image_to_image_run(
    run: Path, image: list[Path] | None, held_out: int, device: str, verb: str, takes: str
) -> Any:
    """The pipeline of a run that has ``verb``, after checking --image / --held-out."""
    import aigc

    for p in image or []:
        if not p.is_file():
            raise RequestError(f"--image {p}: no such file")
    if bool(image) == bool(held_out):
        raise RequestError("give --image FILE (repeatable) or --held-out N")
    gen = aigc.load(run, device=device)
    if verb not in gen.verbs:
        raise RequestError(f"{run} is a {gen.config.family} run; aigc {verb} takes {takes}")
    return gen


@app.command()
def denoise(
    run: Annotated[Path, typer.Argument(help="A speech denoising run folder.")],
    audio: Annotated[Path, typer.Option(help="The noisy audio (WAV, FLAC, OGG, MP3), any length.")],
    out: Annotated[
        Path | None,
        typer.Option(help="The denoised file (.wav, .flac, .ogg or .mp3) [NAME-denoised.wav]."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Denoise speech with a denoising run: the file comes back at its own sample rate and
    length; long files go through in overlapping chunks."""
    import time

    import aigc
    from aigc.data.audio import AUDIO_SUFFIXES, write_audio

    target = out or audio.with_name(f"{audio.stem}-denoised.wav")
    if target.suffix.lower() not in AUDIO_SUFFIXES:
        raise RequestError(f"--out {target}: write .wav, .flac, .ogg or .mp3")
    gen = aigc.load(run, device=device)
    if "denoise" not in gen.verbs:
        raise RequestError(f"{run} is a {gen.config.family} run; aigc denoise takes denoising runs")
    t0 = time.perf_counter()
    result = gen.denoise(audio)
    seconds = time.perf_counter() - t0
    wave, rate = result.waveforms[0], result.sample_rate
    write_audio(target, wave, rate)
    length = len(wave) / rate
    typer.echo(f"wrote {length:.1f} s at {rate} Hz to {target} ({seconds:.2f} s, "
               f"{length / max(seconds, 1e-9):.0f}x real time)")  # fmt: skip


@app.command()
def speak(
    run: Annotated[Path, typer.Argument(help="A text-to-speech or spoken-digit run folder.")],
    text: Annotated[str, typer.Option(help='What to say, e.g. "four two seven" or "427".')],
    out: Annotated[Path, typer.Option(help="The speech file (.wav, .flac, .ogg or .mp3).")] = Path(
        "speech.wav"
    ),
    voice: Annotated[
        str | None, typer.Option(help="One of the run's voices [slt for tts-digits].")
    ] = None,
    speed: Annotated[
        float | None, typer.Option(help="0.25 to 4; 1 is the voice's own pace.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Same seed, same sound.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    watermark_key: Annotated[
        str | None,
        typer.Option(help="Mark the speech inaudibly with this key (aigc detect --audio)."),
    ] = None,
) -> None:
    """Say text with a speech run and write it to --out; prints the real-time factor."""
    import time

    import aigc
    from aigc.data.audio import AUDIO_SUFFIXES, write_audio

    if out.suffix.lower() not in AUDIO_SUFFIXES:
        raise RequestError(f"--out {out}: write .wav, .flac, .ogg or .mp3")
    gen = aigc.load(run, device=device)
    if "speak" not in gen.verbs:
        raise RequestError(f"{run} is a {gen.config.family} run; aigc speak takes text-to-speech "
                           "and spoken-digit runs")  # fmt: skip
    t0 = time.perf_counter()
    result = gen.speak(text, voice=voice, speed=speed, seed=seed, watermark=watermark_key)
    seconds = time.perf_counter() - t0
    wave, rate = result.waveforms[0], result.sample_rate
    write_audio(out, wave, rate)
    length = len(wave) / rate
    typer.echo(f"wrote {length:.2f} s at {rate} Hz to {out} ({seconds:.2f} s, real-time factor "
               f"{seconds / max(length, 1e-9):.3f})")  # fmt: skip


@app.command()
def restore(
    run: Annotated[Path, typer.Argument(help="A restoration or super-resolution run folder.")],
    image: Annotated[
        list[Path] | None,
        typer.Option(help="An image to restore (PNG, JPEG, WebP, BMP, GIF); repeatable."),
    ] = None,
    held_out: Annotated[
        int,
        typer.Option(
            "--held-out",
            help="Instead of --image: this many of the run's held-out images, damaged as "
            "in training, restored, and shown beside their damaged input and the truth.",
        ),
    ] = 0,
    degrade: Annotated[
        bool,
        typer.Option(
            help="Damage the given clean images as the run was trained to undo first, and "
            "save damaged | restored | original side by side."
        ),
    ] = False,
    scale: Annotated[
        int | None,
        typer.Option(help="Check the super-resolution factor: the run's own (2, 3 or 4)."),
    ] = None,
    steps: Annotated[
        int | None, typer.Option(help="Diffusion restorers: sampling steps [the run's].")
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(help="Diffusion restorers: ddpm, ddim, euler, heun or dpm++2m [the run's]."),
    ] = None,
    seed: Annotated[
        int, typer.Option(help="The damage's seed (--degrade, --held-out) and the sampler's.")
    ] = 0,
    out: Annotated[
        Path | None,
        typer.Option(help="The restored .png (with several images: NAME-0.png, NAME-1.png, ...)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Restore images with a restoration run: remove noise, JPEG artefacts or missing
    blocks, or super-resolve by the run's factor."""

    gen = _image_to_image_run(run, image, held_out, device, "restore", "restore runs")
    sampling = {"num_inference_steps": steps, "scheduler": scheduler}
    if held_out:
        grid = gen.compare(n=held_out, seed=seed, **sampling)
        target = out or Path(run) / "samples" / "restored-held-out.png"
        gen.save([grid], target)
        typer.echo(f"wrote {held_out} held-out images (damaged | restored | truth) to {target}")
        return
    if degrade:
        grid = gen.compare(images=[str(p) for p in image], seed=seed, **sampling)
        target = out or Path(run) / "samples" / "restored.png"
        gen.save([grid], target)
        typer.echo(f"wrote {len(image)} images (damaged | restored | original) to {target}")
        return
    gen.check_scale(scale)
    restored = gen.restore([str(p) for p in image], output="uint8", seed=seed, **sampling)
    target = out or Path(run) / "samples" / "restored.png"
    paths = gen.save(restored, target)
    where = paths[0] if len(paths) == 1 else f"{paths[0]} ... {paths[-1]}"
    typer.echo(f"wrote {len(paths)} restored image{'s' if len(paths) > 1 else ''} to {where}")


@app.command()
def translate(
    run: Annotated[Path, typer.Argument(help="A translation run folder (cyclegan or pix2pix).")],
    image: Annotated[
        list[Path] | None,
        typer.Option(help="An image to translate (PNG, JPEG, WebP, BMP, GIF); repeatable."),
    ] = None,
    held_out: Annotated[
        int,
        typer.Option(
            "--held-out",
            help="Instead of --image: this many of the run's held-out images, translated and "
            "shown beside the input and the cycle back (cyclegan) or the true pair (pix2pix).",
        ),
    ] = 0,
    direction: Annotated[
        str | None,
        typer.Option(
            help="a2b or b2a: from which domain to which (default: the run's first, a2b)."
        ),
    ] = None,
    compare: Annotated[
        bool,
        typer.Option(help="Save input | translation | cycle back side by side for --image."),
    ] = False,
    out: Annotated[
        Path | None,
        typer.Option(help="The translated .png (several images: NAME-0.png, NAME-1.png, ...)."),
    ] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Translate images from one domain to the other with a CycleGAN or pix2pix run."""

    gen = _image_to_image_run(
        run, image, held_out, device, "translate", "cyclegan and pix2pix runs"
    )
    direction = gen.check_direction(direction)
    if held_out or compare:
        grid = gen.compare(images=[str(p) for p in image] if image else None, n=held_out or 8,
                           direction=direction)  # fmt: skip
        target = out or Path(run) / "samples" / f"translated-{direction}-compared.png"
        gen.save([grid], target)
        typer.echo(f"wrote {held_out or len(image)} images (input | {direction} | ...) to {target}")
        return
    translated = gen.translate([str(p) for p in image], direction=direction, output="uint8")
    target = out or Path(run) / "samples" / f"translated-{direction}.png"
    paths = gen.save(translated, target)
    where = paths[0] if len(paths) == 1 else f"{paths[0]} ... {paths[-1]}"
    typer.echo(f"wrote {len(paths)} translated image{'s' if len(paths) > 1 else ''} to {where}")


@app.command("eval")
def eval_(
    run: Annotated[Path, typer.Argument(help="A run folder.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
    samples: Annotated[
        int | None, typer.Option("--n", help="Image runs: generated images to judge.")
    ] = None,
    iwae_k: Annotated[
        int | None,
        typer.Option(help="VAE runs: importance samples per image for the IWAE bound [1000]."),
    ] = None,
    metrics: Annotated[
        str | None,
        typer.Option(help="Image runs: feature metrics, comma-separated: fid,kid,pr,is,dc."),
    ] = None,
    against: Annotated[
        str | None,
        typer.Option(help="Image runs: reference data (digits, shapes, a folder, ...) [run's]."),
    ] = None,
    inception_weights: Annotated[
        str | None,
        typer.Option(
            help="FID Inception weights file [$AIGC_INCEPTION_WEIGHTS]; else the domain "
            "classifier's features."
        ),
    ] = None,
    fid_protocol: Annotated[
        str | None,
        typer.Option(
            help="How images enter the Inception network: pytorch-fid (as pytorch-fid) or tf "
            "(TensorFlow 1's resize, as the original FID code and torch-fidelity) "
            "[data.fid_protocol, pytorch-fid]."
        ),
    ] = None,
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="Diffusion runs: sample with this scheduler (ddpm, ddim, euler, heun, "
            "dpm++2m) instead of the run's; saved to eval-NAME-STEPS.json [model.sampler]."
        ),
    ] = None,
    steps: Annotated[
        int | None,
        typer.Option(help="Diffusion runs: sampling steps [model.sample_steps]."),
    ] = None,
    guidance: Annotated[
        float | None,
        typer.Option(
            help="Conditional diffusion runs: classifier-free guidance scale; saved to "
            "eval-NAME-STEPS-gSCALE.json [model.guidance]."
        ),
    ] = None,
) -> None:
    """Evaluate a run and save eval.json: held-out loss, perplexity and bits per character for
    text; for images, a domain classifier's verdict on generated samples, and for VAEs the
    held-out negative ELBO and IWAE bound."""
    import aigc
    from aigc.api import save_eval

    gen = aigc.load(run, device=device)
    if gen.kind in ("image", "spoken"):
        result = gen.evaluate(
            n=samples, iwae_k=iwae_k, metrics=metrics.split(",") if metrics is not None else None,
            against=against, inception_weights=inception_weights, fid_protocol=fid_protocol,
            scheduler=scheduler, steps=steps, guidance=guidance, save=False,
        )  # fmt: skip
    elif gen.kind == "restore":
        result = gen.evaluate(save=False, scheduler=scheduler, steps=steps)
    else:
        result = gen.evaluate(save=False)
    typer.echo(json.dumps(result, indent=2) if as_json else gen.format_eval(result))
    save_eval(gen.run.path, result)  # after printing: a read-only run still shows its numbers


@app.command()
def finetune(
    base: Annotated[Path, typer.Argument(help="The GPT or diffusion run to start from.")],
    overrides: Annotated[
        list[str] | None,
        typer.Argument(help="Dotted overrides, e.g. data.path=my_code/ train.max_steps=1000."),
    ] = None,
    method: Annotated[
        str, typer.Option(help="full (every weight) or lora (adapters only).")
    ] = "full",
    lora_rank: Annotated[int, typer.Option(help="LoRA: rank of the adapters.")] = 8,
    lora_alpha: Annotated[
        float, typer.Option(help="LoRA: scale alpha (update * alpha/rank).")
    ] = 16.0,
    lora_targets: Annotated[
        str | None,
        typer.Option(
            help="LoRA: linear layers to adapt, comma-separated [GPT: c_attn,c_proj,c_fc; "
            "diffusion: kv]."
        ),
    ] = None,
    task: Annotated[
        str | None,
        typer.Option(
            help="GPT runs: lm (more language modelling, the default), classify (a "
            "classification head) or chat (conversations in the chat template). Diffusion "
            "runs: concept (new images and captions, the default; data.path=FOLDER) or "
            "inpaint (a model that also reads the masked image and the mask)."
        ),
    ] = None,
    run_dir: Annotated[
        Path | None, typer.Option(help="The new run folder [BASE-TASK-METHOD beside BASE].")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="No progress bar.")] = False,
) -> None:
    """Fine-tune a run into a new run that starts from its weights. A GPT run: its weights
    and tokenizer, full or LoRA; default data: the standard library's Python sources (lm),
    its docstrings labelled by package (classify), Q&A from the Python docs (chat). A
    text-to-image run: a new concept from a folder of captioned images (--task concept,
    full or LoRA, the base's own data kept in every batch), or --task inpaint, an
    inpainting model on the base's data."""
    import aigc

    with _says_where_it_stopped():
        outcome = aigc.finetune(
            base, overrides or [], method=method, run_dir=run_dir, lora_rank=lora_rank,
            lora_alpha=lora_alpha, task=task, progress=not quiet,
            lora_targets=None if lora_targets is None else [t for t in lora_targets.split(",") if t],
        )  # fmt: skip
    m = outcome.metrics
    shown = f", held-out loss {m['loss']:.4f}" if "loss" in m else ""
    if "accuracy" in m:
        shown += f", accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}"
    run_word = _q(outcome.run_dir)
    nxt = {"classify": f"aigc classify {run_word} --text '...'",
           "chat": f"aigc chat {run_word}",
           "inpaint": f"aigc edit {run_word} --image in.png --mask mask.png",
           "concept": f"aigc sample {run_word} --prompt '...'"}.get(
               task, f"aigc sample {run_word}")  # fmt: skip
    typer.echo(f"done: step {outcome.step}{shown}; run folder: {outcome.run_dir}/   next: {nxt}")


@app.command()
def classify(
    run: Annotated[Path, typer.Argument(help="A classifier run folder.")],
    text: Annotated[
        list[str] | None,
        typer.Option("--text", "-t", help="A text to classify; repeatable. '-' reads stdin."),
    ] = None,
    top: Annotated[int, typer.Option(help="Show this many most likely classes.")] = 5,
    as_json: Annotated[bool, typer.Option("--json", help="Print the results as JSON.")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Classify texts with a classifier run: the label and the class probabilities."""
    import aigc

    texts = [sys.stdin.read() if t == "-" else t for t in (text or [])]
    if not texts:
        raise RequestError("give a text with --text '...' (repeatable, '-' for stdin)")
    if top < 1:
        raise RequestError(f"--top {top} must be at least 1")
    clf = aigc.load(run, device=device)
    if clf.kind != "classify":
        raise RequestError(f"{run} is not a classifier run; aigc finetune BASE --task classify")
    results = clf.classify(texts)
    if as_json:
        typer.echo(json.dumps(results, indent=2))
        return
    for t, r in zip(texts, results, strict=True):
        shown = t if len(t) <= 70 else t[:67] + "..."
        typer.echo(f"{shown!r}\n  label: {r['label']}")
        for name, p in sorted(r["probs"].items(), key=lambda kv: -kv[1])[:top]:
            typer.echo(f"  {p:7.2%}  {name}")


@app.command()
def chat(
    run: Annotated[Path, typer.Argument(help="A chat run folder.")],
    system: Annotated[str | None, typer.Option(help="A system message opening the chat.")] = None,
    max_new_tokens: Annotated[int, typer.Option(help="Longest answer, in tokens.")] = 256,
    temperature: Annotated[float, typer.Option(help="0 for greedy decoding.")] = 0.7,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling.")] = None,
    seed: Annotated[int | None, typer.Option(help="Fixes the answers' sampling.")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")] = "auto",
) -> None:
    """Chat with a chat run in the terminal. Lines starting with / are commands:
    /reset forgets the conversation, /exit (or Ctrl-D) ends it."""
    import aigc

    gen = aigc.load(run, device=device)
    if gen.kind != "text" or not gen.is_chat:
        raise RequestError(f"{run} is not a chat run; make one with aigc finetune BASE --task chat")
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = sys.stdin.isatty()
    typer.echo(f"chatting with {run} (step {gen.step}); /reset, /exit")
    turn = 0
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = history[:1] if system else []
            typer.echo("(conversation forgotten)")
            continue
        history.append({"role": "user", "content": line})
        typer.echo("assistant> ", nl=False)
        answer = []
        try:
            for piece in gen.chat_stream(
                _fit_history(gen, history), max_new_tokens=max_new_tokens,
                temperature=temperature, top_p=top_p,
                seed=None if seed is None else seed + turn,
            ):  # fmt: skip
                answer.append(piece)
                typer.echo(piece, nl=False)
        except RequestError as e:
            typer.echo(f"\n(error: {e})")
            history.pop()
            continue
        typer.echo()
        history.append({"role": "assistant", "content": "".join(answer).strip() or "..."})
        turn += 1


def _fit_history(gen: object, history: list[dict[str, str]]) -> list[dict[str, str]]:
    """The latest turns that fit the model's context (the system message kept), so the
    oldest turns are forgotten first instead of being cut mid-sentence."""
    block = gen.config.model.block_size
    head = history[:1] if history and history[0]["role"] == "system" else []
    turns = history[len(head) :]
    while len(turns) > 1:
        if len(gen.tokenizer.encode(gen.chat_prompt(head + turns))) <= block:
            break
        turns = turns[2:] if len(turns) > 2 else turns[1:]
    return head + turns


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A GPT run folder.")],
    fmt: Annotated[
        str,
        typer.Option(
            "--format", help="hf (transformers folder), onnx (one .onnx file) or run (aigc run)."
        ),
    ] = "hf",
    merge: Annotated[
        bool, typer.Option(help="LoRA runs: write a plain aigc run with the adapters merged.")
    ] = False,
    out: Annotated[
        Path | None, typer.Option(help="Where to write [RUN/export-hf or RUN/model.onnx].")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing export.")] = False,
) -> None:
    """Export a GPT run for other tools: a Hugging Face transformers folder (GPT-2
    architecture, fast tokenizer) or an ONNX graph (needs: pip install 'aigc[export]')."""
    from aigc.export import export_hf, export_onnx

    if merge or fmt == "run":
        from aigc.api import export_merged

        path = export_merged(run, out or run.parent / f"{run.name}-merged")
        typer.echo(f"wrote {path}/ (a plain run: the adapters merged into the base's weights)")
        return
    if fmt == "hf":
        path = export_hf(run, out or run / "export-hf", overwrite=overwrite)
        typer.echo(f"wrote {path}/ (AutoModelForCausalLM.from_pretrained({str(path)!r}))")
    elif fmt == "onnx":
        path = export_onnx(run, out or run / "model.onnx", overwrite=overwrite)
        typer.echo(f"wrote {path} (input_ids (batch, seq) int64 -> logits)")
    else:
        raise RequestError(f"--format {fmt!r}: choose hf or onnx")


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(help="One or more run folders.")],
    out: Annotated[Path, typer.Option(help="The HTML file to write.")] = Path("report.html"),
) -> None:
    """Write one self-contained HTML page about runs: config, loss curves, metrics, samples;
    with several runs, a comparison table first."""
    from aigc.report import write_report

    path = write_report(list(runs), out)
    typer.echo(
        f"wrote {path} ({len(runs)} run{'s' if len(runs) > 1 else ''}); open it in a browser"
    )


@contextlib.contextmanager
def _denoising_bar() -> Iterator[Callable[[int, int, object], None]]:
    """A pipeline callback that shows a progress bar over the denoising steps, made at
    the first step (once the request has been checked) and closed on the way out."""
    from tqdm import tqdm

    bars: list = []
    quiet = os.environ.get("AIGC_NO_PROGRESS") == "1"

    def advance(i: int, count: int, _: object) -> None:
        if not bars:
            bars.append(tqdm(total=count, desc="denoise", unit="step", leave=False,
                             disable=quiet))  # fmt: skip
        bars[0].update(1)

    try:
        yield advance
    finally:
        for bar in bars:
            bar.close()


def _sample_diffusion(gen, run: Path, n: int, out: Path | None, prompts: list[str],
                      class_: str | None, label: list[str], seed: int | None,
                      options: dict, watermark: str | None = None,
                      signer: object = None) -> None:  # fmt: skip
    """Images from a diffusion run, with a progress bar over the denoising steps: n per
    prompt (a row of the grid each) for a text-to-image run, else n for the labels;
    marked with the ``watermark`` key and their provenance signed by ``signer``."""

    labels: list = ([class_] if class_ is not None else []) + list(label)
    if prompts and len(prompts) > 1:
        if not 1 <= n * len(prompts) <= 10_000:
            raise RequestError(f"--n {n} times {len(prompts)} prompts must be in [1, 10000]")
        prompt: str | list[str] | None = [p for p in prompts for _ in range(n)]
        total = n * len(prompts)
    else:
        prompt, total = (prompts[0] if prompts else None), n
    with _denoising_bar() as advance:
        result = gen(total, labels=labels or None, seed=seed, prompt=prompt, callback=advance,
                     watermark=watermark, **options)  # fmt: skip
    target = out or Path(run) / "samples" / "sample.png"
    paths = gen.save(result.images, target, nrow=n if len(prompts) > 1 else None)
    where = paths[0] if len(paths) == 1 else f"{target}/ ({len(paths)} PNG files)"
    typer.echo(f"wrote {len(result.images)} images to {where}")
    cfg = gen.model.cfg
    asked = {"seed": seed, "n": total, "prompt": prompt, "labels": labels,
             "negative_prompt": options.get("negative_prompt"),
             "scheduler": options.get("scheduler") or cfg.sampler,
             "num_inference_steps": options.get("num_inference_steps") or cfg.sample_steps,
             "guidance_scale": cfg.guidance if options.get("guidance_scale") is None
             else options["guidance_scale"]}  # fmt: skip
    _sign(gen, paths, signer, asked, watermark)


def _sample_spoken(gen, run: Path, n: int, out: Path | None, class_: str | None,
                   label: list[str], seed: int | None, options: dict,
                   watermark: str | None = None) -> None:  # fmt: skip
    """One-second clips from a spoken-digit run, one WAV each in the --out folder, marked
    with the ``watermark`` key."""
    labels: list = ([class_] if class_ is not None else []) + list(label)
    folder = out or Path(run) / "samples" / "spoken"
    if folder.suffix:
        raise RequestError(f"--out {folder}: give a folder; each clip is written as a .wav in it")
    with _denoising_bar() as advance:
        result = gen(n, labels=labels or None, seed=seed, callback=advance, **options)
    paths = gen.postprocess(gen.to_audio(result.images, seed), watermark).save(folder)
    typer.echo(f"wrote {len(paths)} one-second clip{'s' if len(paths) != 1 else ''} to "
               f"{folder}/ (NNNNN.wav)")  # fmt: skip


def _sample_images(gen, run: Path, n: int, out: Path | None, class_: str | None,
                   label: list[str], interpolate: int | None, seed: int | None,
                   watermark: str | None = None, signer: object = None) -> None:  # fmt: skip

    labels: list = list(label)
    if class_ is not None:
        labels.insert(0, class_)  # a class name first, else an index
    if interpolate is not None:
        if not 2 <= interpolate <= 64:
            raise RequestError(f"--interpolate {interpolate} must be in [2, 64]")
        if not 1 <= n <= 10_000 or n < interpolate:
            raise RequestError(f"--n {n} must be in [{interpolate}, 10000] with --interpolate")
        rows = n // interpolate
        images = gen.interpolate(interpolate, rows=rows, labels=labels or None, seed=seed,
                                 watermark=watermark)  # fmt: skip
        nrow = interpolate
    else:
        images = gen.generate(n, labels=labels or None, seed=seed, watermark=watermark)
        nrow = None
    target = out or Path(run) / "samples" / ("interpolation.png" if interpolate else "sample.png")
    paths = gen.save(images, target, nrow=nrow)
    where = paths[0] if len(paths) == 1 else f"{target}/ ({len(paths)} PNG files)"
    typer.echo(f"wrote {len(images)} images to {where}")
    asked = {"seed": seed, "n": len(images), "labels": labels, "interpolate": interpolate}
    _sign(gen, paths, signer, asked, watermark)


def _sign(gen, paths: list[Path], signer: object, request: dict, watermark: str | None) -> None:
    """Embeds a signed provenance manifest in each written PNG (aigc.safety.provenance)."""
    if signer is None:
        return
    from aigc.safety.provenance import key_id, sign_outputs

    sign_outputs(gen, paths, signer, request, watermarked=watermark is not None)
    typer.echo(f"signed the provenance of {len(paths)} file{'s' if len(paths) != 1 else ''} "
               f"(key {key_id(signer.public_key())}); check with: aigc verify FILE")  # fmt: skip


def _sample_texts(gen, prompts: list[str], n: int, out: Path | None, kw: dict) -> None:
    """n completions per prompt, to --out as JSON Lines ({"prompt", "text", "seed"}) or,
    without --out, to the terminal. Seeds run seed, seed + 1, ... over the completions."""
    from aigc.pipelines.base import check_count

    check_count(n, limit=10_000)
    if out is not None and out.suffix != ".jsonl":
        raise RequestError(f"--out {out}: text samples are written as JSON Lines (.jsonl)")
    rows = [p for p in prompts for _ in range(n)]
    seed = kw.pop("seed")
    texts = [gen.generate(p, seed=None if seed is None else seed + i, **kw)
             for i, p in enumerate(rows)]  # fmt: skip
    if out is None:
        for i, (p, t) in enumerate(zip(rows, texts, strict=True)):
            typer.echo(f"--- {i} ---\n{p}{t}")
        return
    from aigc.runs import atomic_write_text

    lines = [json.dumps({"prompt": p, "text": t, "seed": None if seed is None else seed + i})
             for i, (p, t) in enumerate(zip(rows, texts, strict=True))]  # fmt: skip
    atomic_write_text(out, "".join(line + "\n" for line in lines))
    typer.echo(f"wrote {len(lines)} text sample{'s' if len(lines) != 1 else ''} to {out}")


def main() -> None:
    """Entry point of the `aigc` console script and `python -m aigc`."""
    import warnings

    # warnings meant for users (e.g. a singular covariance in FID) read as one line
    warnings.formatwarning = lambda message, category, *args, **kwargs: f"warning: {message}\n"
    try:
        # Standalone mode: click reports its own usage errors (exit 2) and --help.
        app()
    except AigcError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except OSError as e:
        from aigc.runs import STORAGE_ERRNOS, storage_error

        if e.errno not in STORAGE_ERRNOS:
            raise
        typer.echo(f"error: {storage_error(e, e.filename or 'a file')}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("\ninterrupted", err=True)
        sys.exit(130)


# `aigc serve`: its flags, help and logic live in aigc.serve.cli, which imports neither
# FastAPI nor torch until the command runs.
from aigc.serve.cli import serve_command  # noqa: E402

app.command("serve")(serve_command)

# `aigc detect`: watermark and generated-content detection (aigc.safety.cli)
from aigc.safety.cli import detect_command, train_detector_command  # noqa: E402

app.command("detect")(detect_command)
app.command("train-detector")(train_detector_command)

# `aigc data clean`: PII redaction and de-duplication of a corpus (aigc.data.clean)
from aigc.data.clean import clean_command  # noqa: E402

data_app = typer.Typer(help="Prepare corpora: clean (redact personal data, drop duplicates).",
                       no_args_is_help=True)  # fmt: skip
data_app.command("clean")(clean_command)
app.add_typer(data_app, name="data")

# `aigc keys new` and `aigc verify`: signed provenance of generated files
from aigc.safety.provenance_cli import keys_app, verify_command  # noqa: E402

app.add_typer(keys_app, name="keys")
app.command("verify")(verify_command)
