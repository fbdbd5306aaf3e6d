"""The training corpus (modeling_csp.data.corpus): wheels fetched by pip with pinned hashes (from a local index, offline),
vendored and non-UTF-8 files skipped, duplicates and near-copies of held-out files dropped, token arrays and meta."""

import hashlib
import json
import zipfile

import numpy as np
import pytest

from conftest import PROJECT_ROOT
from modeling_csp.data import corpus
from modeling_csp.data.corpus import Pin, build_corpus, fetch_wheels, requirements_text, split_documents, wheel_documents

TOKENIZER = PROJECT_ROOT / "modeling_csp" / "default_model" / "tokenizer.json"
HELD = "def held_out_function(argument_one, argument_two):\n    return argument_one + argument_two * 1000\n"


def make_wheel(folder, name="toypkg", version="1.0", files=None):
    """A minimal valid py3-none-any wheel with the given {path: bytes}."""
    files = files or {
        f"{name}/__init__.py": b"VALUE = 1\n",
        f"{name}/core.py": b"def add(a, b):\n    return a + b\n",
        f"{name}/_vendor/six.py": b"# vendored copy\nx = 1\n",
        f"{name}/latin1.py": "s = 'caf\xe9'\n".encode("latin-1"),
    }
    dist = f"{name}-{version}.dist-info"
    path = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, data in files.items():
            z.writestr(p, data)
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return path


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A PEP 503 package index on disk with one wheel: (index url, pin of that wheel)."""
    root = tmp_path_factory.mktemp("index")
    wheel = make_wheel(root)
    (root / "simple" / "toypkg").mkdir(parents=True)
    (root / "simple" / "toypkg" / "index.html").write_text(f'<a href="../../{wheel.name}">{wheel.name}</a>\n')
    sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
    return (root / "simple").as_uri(), Pin("toypkg", "1.0", "MIT", sha)


def test_pins_are_unique_and_permissive():
    names = [p.name for p in corpus.PACKAGES]
    assert len(names) == len(set(names)) >= 50
    assert all(len(p.sha256) == 64 for p in corpus.PACKAGES)
    assert all(any(l in p.license for l in ("MIT", "BSD", "Apache")) for p in corpus.PACKAGES)
    text = requirements_text(corpus.PACKAGES[:2])
    assert text.startswith(f"django==5.1.4 --hash=sha256:{corpus.PACKAGES[0].sha256}\n") and text.count("\n") == 2


def test_fetch_checks_the_pinned_hash(index, tmp_path):
    url, pin = index
    got = fetch_wheels([pin], tmp_path / "w", index_url=url)
    assert got[pin].name == "toypkg-1.0-py3-none-any.whl"
    assert fetch_wheels([pin], tmp_path / "w", index_url="file:///nonexistent")[pin] == got[pin]  # present: no pip
    bad = Pin("toypkg", "1.0", "MIT", "0" * 64)
    with pytest.raises(RuntimeError, match="pip download of 1 pinned wheels failed"):
        fetch_wheels([bad], tmp_path / "w2", index_url=url)
    (tmp_path / "w3").mkdir()
    (tmp_path / "w3" / got[pin].name).write_bytes(b"tampered")
    with pytest.raises(RuntimeError, match="pip download"):  # a tampered local copy is fetched again, and checked
        fetch_wheels([bad], tmp_path / "w3", index_url=url)


def test_wheel_documents_skip_vendored_and_non_utf8(tmp_path):
    docs = dict(wheel_documents(make_wheel(tmp_path)))
    assert sorted(docs) == ["toypkg/__init__.py", "toypkg/core.py"]
    big = make_wheel(tmp_path / "", "bigpkg", files={f"bigpkg/m{i}.py": b"x = 1\n" * 100 for i in range(10)})
    subset = wheel_documents(big, max_bytes=2500)
    assert len(subset) == 4 and subset == wheel_documents(big, max_bytes=2500)  # deterministic


def test_split_drops_duplicates_and_near_copies_of_held_out_files(monkeypatch):
    monkeypatch.setattr(corpus, "is_stdlib_heldout", lambda path: path == "held.py")
    near = HELD + "# one more line\n"
    docs, dropped = split_documents([
        ("stdlib", [("a.py", "import os\n\nprint(os.sep)\n"), ("held.py", HELD)]),
        ("pkg==1", [("copy_of_a.py", "import os\nprint(os.sep)   \n"), ("near.py", near), ("b.py", "y = 2\n")]),
    ])
    kept = {(d.source, d.path): d.split for d in docs}
    assert kept == {("stdlib", "a.py"): "train", ("stdlib", "held.py"): "val", ("pkg==1", "b.py"): "train"}
    assert dropped == {"pkg==1": {"duplicate": 1, "near_heldout": 1}}
    docs, dropped = split_documents([("pkg==1", [("held_copy.py", HELD)]), ("stdlib", [("held.py", HELD)])])
    assert [(d.source, d.split) for d in docs] == [("stdlib", "val")]  # the held-out file wins over its copy


def test_build_corpus(index, tmp_path, monkeypatch):
    url, pin = index
    monkeypatch.setattr(corpus, "stdlib_documents", lambda: [("a.py", "import os\nprint(os.sep)\n"), ("held.py", HELD)])
    monkeypatch.setattr(corpus, "is_stdlib_heldout", lambda path: path == "held.py")
    meta = build_corpus(tmp_path / "c", TOKENIZER, tmp_path / "wheels", pins=[pin], index_url=url, progress=False)
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(TOKENIZER))
    train = np.load(tmp_path / "c" / "train.npy")
    assert train.dtype == np.uint16 and (train == 2047).sum() == 3  # a.py, __init__.py, core.py, each + eot
    text = tok.decode(train.tolist(), skip_special_tokens=False)
    assert "print(os.sep)" in text and "def add(a, b)" in text and "vendored" not in text
    assert tok.decode(np.load(tmp_path / "c" / "val.npy").tolist()) == HELD
    assert meta["tokens"] == {"train": len(train), "val": len(tok.encode(HELD).ids) + 1, "val_extra": 0}
    sources = {s["name"]: s for s in meta["sources"]}
    assert sources["toypkg"]["license"] == "MIT" and sources["toypkg"]["sha256"] == pin.sha256
    assert sources["toypkg"]["files"] == {"train": 2} and sources["cpython-stdlib"]["files"] == {"train": 1, "val": 1}
    assert "| toypkg | 1.0 | MIT | 2 |" in corpus.sources_table(meta)
    stamp = (tmp_path / "c" / "train.npy").stat().st_mtime_ns
    assert build_corpus(tmp_path / "c", TOKENIZER, tmp_path / "wheels", pins=[pin], index_url=url, progress=False) == meta
    assert (tmp_path / "c" / "train.npy").stat().st_mtime_ns == stamp  # cached: nothing rebuilt
    assert json.loads((tmp_path / "c" / "meta.json").read_text())["key"] == meta["key"]
