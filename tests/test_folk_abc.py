"""The folk-tune corpus in ABC notation: tunes split out of music21's files as the
module says, a fixed shuffle, and the music-folk-abc recipe trained a few steps."""

from __future__ import annotations

import json

from aigc.data.abc import folk_tunes, split_tunes

from .conftest import ROOT, TINY


def test_tunes_are_split_renumbered_and_stripped_of_catalogue_and_notes():
    text = (
        "% a file header\n\nX:7\nT: First\nN: A0001\nZ: by someone <a@b.c>\nM: 3/4\nK: G\n"
        "GAB | c3 |\n\nX:8\nT: Second\nM: 2/4\nK: D\nd2 f2 |\n\nX:9\nT: too short\n"
    )
    assert split_tunes(text) == [
        "X:1\nT: First\nM: 3/4\nK: G\nGAB | c3 |",
        "X:1\nT: Second\nM: 2/4\nK: D\nd2 f2 |",
    ]


def test_the_embedded_collections_give_ten_thousand_tunes_in_a_fixed_order():
    tunes = folk_tunes()
    assert len(tunes) > 10_000
    assert tunes == folk_tunes()  # the shuffle is seeded
    origins = [o.split("/")[0] for o, _ in tunes[:200]]
    assert {"essenFolksong", "oneills1850"} <= set(origins)  # both, mixed
    assert all(t.startswith("X:1\n") and "\nK:" in t for _, t in tunes)
    assert not any("@" in t for _, t in tunes)  # no transcriber's e-mail address left


def test_the_folk_recipe_trains_on_the_embedded_tunes(tmp_path):
    import aigc

    recipe = ROOT / "configs" / "music-folk-abc.yaml"
    run = aigc.train(recipe, [*TINY, "train.max_steps=2", "train.eval_every=0"],
                     run_dir=tmp_path / "run", progress=False)  # fmt: skip
    meta = json.loads((tmp_path / "run" / "data" / "corpus.json").read_text())
    assert run.step == 2
    assert "folk-abc" in meta["source"] and meta["n_documents"] > 10_000
    out = aigc.load(tmp_path / "run").generate("X:1\nT:", max_new_tokens=20, seed=0)
    assert isinstance(out[0], str) and len(out[0]) > 0
