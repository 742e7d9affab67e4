"""The standard library as embedded data: a code corpus and a docstring classification set."""

from __future__ import annotations

import ast
import inspect
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from aigc.data import stdlib
from aigc.data.stdlib import (
    EXCLUDED_DIRS,
    MIN_DOCSTRING_CHARS,
    docstring_dataset,
    read_stdlib,
    split_sources,
    stdlib_sources,
)
from aigc.errors import ConfigError, DataError


@pytest.fixture
def fake_root(tmp_path, monkeypatch) -> Path:
    """An empty folder that stands in for the interpreter's Lib folder."""
    root = tmp_path / "Lib"
    root.mkdir()
    monkeypatch.setattr(stdlib, "stdlib_root", lambda: root)
    return root


def write(root: Path, rel: str, text: str | bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")


# --------------------------------------------------------------------------- sources


def test_real_stdlib_sources_are_sorted_deterministic_and_exclude_tests():
    sources = stdlib_sources()
    paths = [p for p, _ in sources]
    assert len(sources) > 300
    assert paths == sorted(paths)
    assert len(set(paths)) == len(paths)
    assert stdlib_sources() == sources
    sources.clear()  # a copy: the cache is untouched
    assert stdlib_sources()
    assert {"os.py", "json/__init__.py", "email/message.py"} <= set(paths)
    for path in paths:
        assert path.endswith(".py")
        assert not set(path.split("/")[:-1]) & EXCLUDED_DIRS, path
    # Generated files are left out, hand-written neighbours are kept.
    assert "pydoc_data/topics.py" not in paths
    assert "encodings/cp1252.py" not in paths
    assert "encodings/utf_8.py" in paths
    assert not any(p.startswith("_sysconfigdata_") for p in paths)
    assert all("\r" not in text for _, text in stdlib_sources())


def test_split_by_file_is_deterministic_disjoint_and_depends_on_path_only():
    sources = stdlib_sources()
    train, val = split_sources(sources, val_fraction=0.1)
    assert (train, val) == split_sources(sources, val_fraction=0.1)
    train_paths, val_paths = {p for p, _ in train}, {p for p, _ in val}
    assert not train_paths & val_paths
    assert train_paths | val_paths == {p for p, _ in sources}
    assert 0.05 < len(val) / len(sources) < 0.15
    # A file's side does not depend on which other files are split with it.
    _, sub_val = split_sources(sources[::3], val_fraction=0.1)
    assert {p for p, _ in sub_val} == val_paths & {p for p, _ in sources[::3]}
    assert split_sources(sources, val_fraction=0.1, seed=1)[1] != val
    assert split_sources(sources, val_fraction=0.0) == (sources, [])
    with pytest.raises(ConfigError, match="val_fraction"):
        split_sources(sources, val_fraction=1.0)


def test_exclusions_and_undecodable_files_on_a_fake_stdlib(fake_root):
    write(fake_root, "os.py", "import sys\r\n")
    write(fake_root, "pkg/__init__.py", "\ufeff# bom\n")
    write(fake_root, "pkg/mod.py", "x = 'e\u0301'\n")  # decomposed: NFC on read
    write(fake_root, "legacy.py", "# -*- coding: latin-1 -*-\nname = 'caf\xe9'\n".encode("latin-1"))
    write(fake_root, "test/test_os.py", "assert True\n")
    write(fake_root, "pkg/tests/test_mod.py", "assert True\n")
    write(fake_root, "idlelib/idle_test/test_x.py", "assert True\n")
    write(fake_root, "idlelib/editor.py", "class Editor: pass\n")
    write(fake_root, "site-packages/numpy/__init__.py", "third = 'party'\n")
    write(fake_root, "__pycache__/os.py", "cached = True\n")
    write(fake_root, "config-3.11-x86_64-linux-gnu/python-config.py", "built = 1\n")
    write(
        fake_root, "encodings/cp0.py", '""" Python Character Mapping Codec with gencodec.py."""\n'
    )
    write(fake_root, "notes.txt", "not python\n")

    corpus = read_stdlib()
    assert corpus.root == str(fake_root)
    assert [p for p, _ in corpus.files] == [
        "idlelib/editor.py",
        "os.py",
        "pkg/__init__.py",
        "pkg/mod.py",
    ]
    texts = dict(corpus.files)
    assert texts["os.py"] == "import sys\n"
    assert texts["pkg/__init__.py"] == "# bom\n"
    assert texts["pkg/mod.py"] == "x = '\u00e9'\n"
    assert corpus.skipped == ("legacy.py",)
    assert corpus.n_generated == 1
    assert corpus.n_chars == sum(len(t) for t in texts.values())
    assert stdlib_sources() == list(corpus.files)


def test_missing_or_empty_stdlib_folder_is_a_data_error(fake_root, monkeypatch):
    with pytest.raises(DataError, match="no readable Python source"):
        read_stdlib()
    monkeypatch.setattr(stdlib, "stdlib_root", lambda: fake_root / "missing")
    with pytest.raises(DataError, match="does not exist"):
        stdlib_sources()


# --------------------------------------------------------------------------- docstrings


def test_real_docstring_dataset_has_ten_stratified_unique_classes():
    train, val, names = docstring_dataset()
    assert len(names) == 10 and names == sorted(names)
    assert {"asyncio", "email", "logging"} <= set(names)
    texts = [t for t, _ in train + val]
    assert len(texts) == len(set(texts))  # no duplicate, hence no text under two labels
    assert all(len(t) >= MIN_DOCSTRING_CHARS for t in texts)
    n_train, n_val = Counter(y for _, y in train), Counter(y for _, y in val)
    assert set(n_train) == set(n_val) == set(range(10))  # every class on both sides
    for y in range(10):
        assert n_val[y] == round((n_train[y] + n_val[y]) * 0.1)
    # Deterministic, returned as copies, and the seed only reorders and resplits.
    assert docstring_dataset() == (train, val, names)
    train.clear()
    assert docstring_dataset()[0]
    other_train, other_val, other_names = docstring_dataset(seed=1)
    assert other_names == names and other_val != val
    assert sorted(other_train + other_val) == sorted(docstring_dataset()[0] + val)


DEFS = ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef


def independent_labelled_docstrings(root: Path) -> set[tuple[str, str]]:
    """(docstring, label) by a walk over every node of every parsed file, with parent links."""
    pairs = set()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if set(rel.parts[:-1]) & EXCLUDED_DIRS:
            continue
        module = rel.with_suffix("").parts
        if any(p.startswith("_") and not p.endswith("__") for p in module):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(tree):
            if not isinstance(node, DEFS):
                continue
            chain, up = [node], parent[node]
            while up is not tree:
                chain.append(up)
                up = parent[up]
            defs_above = chain[1:]
            allowed = ast.ClassDef | ast.If | ast.Try | ast.ExceptHandler
            if any(not isinstance(d, allowed) for d in defs_above):
                continue  # inside a function: a local helper, not public API
            if any(d.name.startswith("_") for d in chain if isinstance(d, DEFS)):
                continue
            doc = ast.get_docstring(node, clean=False)
            if doc and len(inspect.cleandoc(doc)) >= MIN_DOCSTRING_CHARS:
                pairs.add((inspect.cleandoc(doc), module[0]))
    return pairs


FAKE_MODULES = {
    "alpha/__init__.py": '''
def load(path):
    """Load a thing from a path and return it, the alpha way."""
    def helper():
        """A nested helper is a local detail, never part of the API."""

class Reader:
    """Read alpha records one by one from an open file."""

    def read(self):
        """Return the next alpha record, or None at the end."""

    def _skip(self):
        """Private methods are left out of the data set entirely."""

    class Options:
        """Options of a reader: nested classes of public classes count."""

class _Hidden:
    def visible(self):
        """A public method of a private class is private too, left out."""

def short():
    """Too short."""

def shared():
    """This exact docstring appears in alpha and in beta packages."""
''',
    "alpha/sub/deep.py": '''
import sys

if sys.platform == "win32":
    def open_file(name):
        """Open a file the Windows way, defined under an if statement."""
else:
    try:
        from os import fspath
    except ImportError:
        def fspath(path):
            """A fallback defined in an except handler is public API too."""
async def fetch(url):
    """
    Fetch a URL asynchronously, with an indented docstring
        that cleandoc must dedent.
    """
''',
    "alpha/_impl.py": '''
def work():
    """A public function of a private module is not public API."""
''',
    "beta.py": '''
def shared():
    """This exact docstring appears in alpha and in beta packages."""

def one():
    """Beta says the same thing twice, and it is kept only once."""

def two():
    """Beta says the same thing twice, and it is kept only once."""

def three():
    """A third beta docstring, distinct from the other ones here."""
''',
    "gamma.py": '''
def only():
    """Gamma has a single docstring and is the smallest label of all."""
''',
    "_private_top.py": '''
def api():
    """Private top-level modules give no label and no docstrings."""
''',
    "test/test_alpha.py": '''
def test_load():
    """Tests are excluded along with their whole folder, as documented."""
''',
}


def test_docstring_labels_match_an_independent_walk_of_a_fake_stdlib(fake_root):
    for rel, text in FAKE_MODULES.items():
        write(fake_root, rel, text)
    train, val, names = docstring_dataset(n_classes=2, seed=0, val_fraction=0.5)
    assert names == ["alpha", "beta"]
    got = {(text, names[y]) for text, y in train + val}

    walked = independent_labelled_docstrings(fake_root)
    labels_of = defaultdict(set)
    for text, label in walked:
        labels_of[text].add(label)
    expected = {(t, label) for t, label in walked if len(labels_of[t]) == 1 and label in names}
    assert got == expected
    assert len(train + val) == len(got)  # the duplicate in beta is kept once

    # The same facts, spelled out, so that both walks cannot be wrong together.
    texts = {t for t, _ in got}
    assert (
        "Fetch a URL asynchronously, with an indented docstring\n    that cleandoc must dedent."
        in texts
    )
    assert "Options of a reader: nested classes of public classes count." in texts
    assert "Open a file the Windows way, defined under an if statement." in texts
    assert "A fallback defined in an except handler is public API too." in texts
    for absent in (
        "nested helper",
        "Private methods",
        "private class",
        "Too short",
        "appears in alpha",
        "private module",
        "Private top-level",
        "Tests are excluded",
        "Gamma",
    ):
        assert not any(absent in t for t in texts), absent
    # Stratified: each class on both sides, deterministically.
    assert {y for _, y in train} == {y for _, y in val} == {0, 1}
    assert docstring_dataset(n_classes=2, seed=0, val_fraction=0.5) == (train, val, names)
    assert docstring_dataset(n_classes=3, val_fraction=0.5)[2] == ["alpha", "beta", "gamma"]


def test_docstring_dataset_arguments_are_checked(fake_root):
    write(fake_root, "beta.py", FAKE_MODULES["beta.py"])
    with pytest.raises(DataError, match="fewer than n_classes=2"):
        docstring_dataset(n_classes=2)
    with pytest.raises(ConfigError, match="n_classes"):
        docstring_dataset(n_classes=0)
    with pytest.raises(ConfigError, match="val_fraction"):
        docstring_dataset(val_fraction=-0.1)
