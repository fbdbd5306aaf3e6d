"""The default model's training corpus: CPython's standard library plus pinned permissively licensed projects.

The corpus is rebuilt the same way on any machine: the standard library of the running Python, plus the
`*.py` files of the pure-Python wheels in `PACKAGES`, downloaded by pip by exact version and checked against
their pinned sha256 (`pip download --require-hashes`, then again here). Then:

- vendored copies (`_vendor/`, `vendor/` folders) are skipped; files that are not UTF-8 or empty are dropped;
- duplicates are removed: a file whose text (trailing spaces and blank lines ignored) was already seen is
  dropped, and so is a training file that shares at least half of its long lines with a held-out file, so
  that no evaluation window is trained on, even as a copy in another project;
- the split is by file: the stdlib's held-out 10% is `ablation.stdlib_heldout_texts`' rule (the text that
  mean activations, node examples and the reported held-out loss use), the projects hold out 2% of files.

`build_corpus` writes `train.npy`, `val.npy` (stdlib held-out), `val_extra.npy` (projects held-out), all uint16
token ids with `<|endoftext|>` after every file, and `meta.json` (sources, versions, licences, hashes, counts).

    python scripts/build_corpus.py --out work_dirs/corpus     # ~60 MB download, a few minutes
"""

from __future__ import annotations

import hashlib
import json
import platform
import re
import subprocess
import sys
import sysconfig
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ..utils.jsonio import atomic_open, write_json_atomic, write_text_atomic

PYPI_INDEX = "https://pypi.org/simple"
STDLIB_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
VENDOR_DIRS = {"_vendor", "vendor", "_vendored"}
STDLIB_VAL_PERCENT = 10  # must stay ablation.stdlib_heldout_texts' rule
PACKAGE_VAL_PERCENT = 2
NEAR_DUP_MIN_CHARS = 30  # lines at least this long (stripped) count for near-duplicate detection
NEAR_DUP_FRACTION = 0.5


@dataclass(frozen=True)
class Pin:
    """One pure-Python wheel of the corpus: exact version, SPDX licence, sha256 of the wheel file."""

    name: str
    version: str
    license: str
    sha256: str
    max_bytes: int | None = None  # keep a deterministic subset of files up to this many bytes of source


# Permissive licences only (MIT, BSD, Apache-2.0); versions as of December 2024; every one a py3-none-any wheel.
PACKAGES: tuple[Pin, ...] = (
    Pin("django", "5.1.4", "BSD-3-Clause", "236e023f021f5ce7dee5779de7b286565fdea5f4ab86bae5338e3f7b69896cf0"),
    Pin("sqlalchemy", "2.0.36", "MIT", "fddbe92b4760c6f5d48162aef14824add991aeda8ddadb3c31d56eb15ca69f8e"),
    Pin("sympy", "1.13.3", "BSD-3-Clause", "54612cf55a62755ee71824ce692986f23c88ffa77207b30c1368eda4a7060f73",
        max_bytes=10_000_000),
    Pin("twisted", "24.11.0", "MIT", "fe403076c71f04d5d2d789a755b687c5637ec3bcd3b2b8252d76f2ba65f54261"),
    Pin("wagtail", "6.3.1", "BSD-3-Clause", "d7d4e4fcb5edb4a5d0aaff5de72eaf33a51e4fa26c2d3a57801c58c4da35b209"),
    Pin("networkx", "3.4.2", "BSD-3-Clause", "df5d4365b724cf81b8c6a7312509d0c22386097011ad1abe274afd5e9d3bbc5f"),
    Pin("xarray", "2024.11.0", "Apache-2.0", "6ee94f63ddcbdd0cf3909d1177f78cdac756640279c0e32ae36819a89cdaba37"),
    Pin("mypy", "1.13.0", "MIT", "9c250883f9fd81d212e0952c92dbfcc96fc237f4b7c92f56ac81fd48460b3e5a"),
    Pin("dask", "2024.12.0", "BSD-3-Clause", "e038e87b9f06e7927b81ecde6cf2b49aa699bb902fec11abba5697cb48baeb8d"),
    Pin("nltk", "3.9.1", "Apache-2.0", "4fa26829c5b00715afe3061398a8989dc643b92ce7dd93fb4585a70930d168a1"),
    Pin("pygments", "2.18.0", "BSD-2-Clause", "b8e6aca0523f3ab76fee51799c488e38782ac06eafcf95e7ba832985c8e7b13a"),
    Pin("pyglet", "2.0.20", "BSD-3-Clause", "341cdc506fe97c4d8c4fb35aac89cefcb0ca6bf59eddcf2d1078c327dde1f02e"),
    Pin("fonttools", "4.55.3", "MIT", "f412604ccbeee81b091b420272841e5ec5ef68967a9790e80bffd0e30b8e2977"),
    Pin("setuptools", "75.6.0", "MIT", "ce74b49e8f7110f9bf04883b730f4765b774ef3ef28f722cce7c273d253aaf7d"),
    Pin("cython", "3.0.11", "Apache-2.0", "0e25f6425ad4a700d7f77cd468da9161e63658837d1bc34861a9861a4ef6346d"),
    Pin("sphinx", "8.1.3", "BSD-2-Clause", "09719015511837b76bf6e03e42eb7595ac8c2e41eeb9c29c5b755c6b677992a2"),
    Pin("bokeh", "3.6.2", "BSD-3-Clause", "fddc4b91f8b40178c0e3e83dfcc33886d7803a3a1f041a840834255e435a18c2"),
    Pin("pyqtgraph", "0.13.7", "MIT", "7754edbefb6c367fa0dfb176e2d0610da3ada20aa7a5318516c74af5fb72bf7a"),
    Pin("ipython", "8.30.0", "BSD-3-Clause", "85ec56a7e20f6c38fce7727dcca699ae4ffc85985aa7b23635a8008f918ae321"),
    Pin("textual", "1.0.0", "MIT", "2d4a701781c05104925e463ae370c630567c70c2880e92ab838052e3e23c986f"),
    Pin("pydantic", "2.10.3", "MIT", "be04d85bbc7b65651c5f8e6b9976ed9c6f41782a55524cef079a34a0bb82144d"),
    Pin("trio", "0.27.0", "MIT OR Apache-2.0", "68eabbcf8f457d925df62da780eff15ff5dc68fd6b367e2dde59f7aaf2a0b884"),
    Pin("celery", "5.4.0", "BSD-3-Clause", "369631eb580cf8c51a82721ec538684994f8277637edde2dfc0dacd73ed97f64"),
    Pin("prompt-toolkit", "3.0.48", "BSD-3-Clause", "f49a827f90062e411f1ce1f854f2aedb3c23353244f8108b89283587397ac10e"),
    Pin("pytest", "8.3.4", "MIT", "50e16d954148559c9a74109af1eaf0c945ba2d8f30f0a3d3335edde19788b6f6"),
    Pin("rich", "13.9.4", "MIT", "6049d5e6ec054bf2779ab3358186963bac2ea89175919d699e378b99738c2a90"),
    Pin("scrapy", "2.12.0", "BSD-3-Clause", "c33e2dc7da42e727390bacb32dd9938a54ac210fa71972b5c392754f478669cd"),
    Pin("alembic", "1.14.0", "MIT", "99bd884ca390466db5e27ffccff1d179ec5c05c965cfefc0607e69f9e411cb25"),
    Pin("openpyxl", "3.1.5", "MIT", "5282c12b107bffeef825f4617dc029afaf41d0ea60823bbb665ef3079dc79de2"),
    Pin("jedi", "0.19.2", "MIT", "a8ef22bde8490f57fe5c7681a3c83cb58874daf72b4784de3cce5b6ef6edb5b9"),
    Pin("werkzeug", "3.1.3", "BSD-3-Clause", "54b78bf3716d19a65be4fceccc0d1d7b89e608834989dfae50ea87564639213e"),
    Pin("kombu", "5.4.2", "BSD-3-Clause", "14212f5ccf022fc0a70453bb025a1dcc32782a588c49ea866884047d66e14763"),
    Pin("fastapi", "0.115.6", "MIT", "e9240b29e36fa8f4bb7290316988e90c381e5092e0cbe84e7818cc3713bcf305"),
    Pin("boltons", "24.1.0", "BSD-3-Clause", "a1776d47fdc387fb730fba1fe245f405ee184ee0be2fb447dd289773a84aed3b"),
    Pin("black", "24.10.0", "MIT", "3bb2b7a1f7b685f85b11fed1ef10f8a9148bceb49853e47a294a3dd963c1dd7d"),
    Pin("djangorestframework", "3.15.2", "BSD-3-Clause", "2b8871b062ba1aefc2de01f773875441a961fefbf79f5eed1e32b2f096944b20"),
    Pin("jinja2", "3.1.4", "BSD-3-Clause", "bc5dd2abb727a5319567b7a813e6a2e7318c39f4f487cfe6c89c6f9c7d25197d"),
    Pin("pyparsing", "3.2.0", "MIT", "93d9577b88da0bbea8cc8334ee8b918ed014968fd2ec383e868fb8afb1ccef84"),
    Pin("urllib3", "2.2.3", "MIT", "ca899ca043dcb1bafa3e262d73aa25c465bfb49e0bd9dd5d59f1d0acba2f8fac"),
    Pin("anyio", "4.7.0", "MIT", "ea60c3723ab42ba6fff7e8ccb0488c898ec538ff4df1f1d5e642c3601d07e352"),
    Pin("click", "8.1.7", "BSD-3-Clause", "ae74fb96c20a0277a1d615f1e4d73c8414f5a98db8b799a7931d1582f3390c28"),
    Pin("flask", "3.1.0", "BSD-3-Clause", "d667207822eb83f1c4b50949b1623c8fc8d51f2341d65f72e1a1815397551136"),
    Pin("isort", "5.13.2", "MIT", "8ca5e72a8d85860d5a3fa69b8745237f2939afe12dbf656afbcb47fe72d947a6"),
    Pin("httpx", "0.28.1", "BSD-3-Clause", "d909fcccc110f8c7faf814ca82a9a4d816bc5a6dbfea25d6591d6985b8ba59ad"),
    Pin("pyflakes", "3.2.0", "MIT", "84b5be138a2dfbb40689ca07e2152deb896a65c3a3e24c251c5c62489568074a"),
    Pin("parso", "0.8.4", "MIT", "a418670a20291dacd2dddc80c377c5c3791378ee1e8d12bffc35420643d43f18"),
    Pin("starlette", "0.41.3", "BSD-3-Clause", "44cedb2b7c77a9de33a8b74b2b90e9f50d11fcf25d8270ea525ad71a25374ff7"),
    Pin("packaging", "24.2", "Apache-2.0 OR BSD-2-Clause", "09abb1bccd265c01f4a3aa3f7a7db064b36514d2cba19a2f694fe6150451a759"),
    Pin("requests", "2.32.3", "Apache-2.0", "70761cfe03c773ceb22aa2f671b4757976145175cdfca038c02654d061d6dcc6"),
    Pin("toolz", "1.0.0", "BSD-3-Clause", "292c8f1c4e7516bf9086f8850935c799a874039c8bcf959d47b600e4c44a6236"),
    Pin("attrs", "24.2.0", "MIT", "81921eb96de3191c8258c199618104dd27ac608d9366f5e35d011eae1867ede2"),
    Pin("marshmallow", "3.23.1", "MIT", "fece2eb2c941180ea1b7fcbd4a83c51bfdd50093fdd3ad2585ee5e1df2508491"),
    Pin("more-itertools", "10.5.0", "MIT", "037b0d3203ce90cca8ab1defbbdac29d5f993fc20131f3664dc8d6acfa872aef"),
    Pin("tomlkit", "0.13.2", "MIT", "7a974427f6e119197f670fbbbeae7bef749a6c14e793db934baefc1b5f03efde"),
    Pin("sqlparse", "0.5.2", "BSD-3-Clause", "e99bc85c78160918c3e1d9230834ab8d80fc06c59d03f8db2618f65f65dda55e"),
    Pin("gunicorn", "23.0.0", "MIT", "ec400d38950de4dfd418cff8328b2c8faed0edb0d517d3394e457c317908ca4d"),
    Pin("sortedcontainers", "2.4.0", "Apache-2.0", "a163dcaede0f1c021485e957a39245190e74249897e2ae4b2aa38595db237ee0"),
    Pin("pycodestyle", "2.12.1", "MIT", "46f0fb92069a7c28ab7bb558f05bfc0110dac69a0cd23c61ea0040283a9d78b3"),
)


# ---- documents -----------------------------------------------------------------------------


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every `*.py` file of the standard library outside test dirs and site-packages, sorted by path."""
    root = root or stdlib_root()
    files = []
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts[:-1]
        if any(part in STDLIB_EXCLUDED_DIRS or part.startswith("test") for part in parts):
            continue
        if path.is_file():
            files.append(path)
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def decode_source(data: bytes) -> str | None:
    """The file as text, or None when it is not UTF-8 or blank (skipped everywhere)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text if text.strip() else None


def hash_percent(key: str) -> int:
    """sha256(key) mod 100: the fixed by-file split rule."""
    return int(hashlib.sha256(key.encode("utf-8")).hexdigest(), 16) % 100


def is_stdlib_heldout(relpath: str) -> bool:
    """The stdlib's held-out 10% (by path relative to the stdlib root)."""
    return hash_percent(relpath) < STDLIB_VAL_PERCENT


def stdlib_documents(root: Path | None = None) -> list[tuple[str, str]]:
    """[(relative path, text)] of the standard library in path order."""
    root = root or stdlib_root()
    docs = []
    for path in stdlib_files(root):
        text = decode_source(path.read_bytes())
        if text is not None:
            docs.append((path.relative_to(root).as_posix(), text))
    return docs


def wheel_documents(wheel: Path, max_bytes: int | None = None) -> list[tuple[str, str]]:
    """[(path inside the wheel, text)] of a wheel's `*.py` files outside vendored folders, in path order.

    With `max_bytes`, a deterministic subset (files ordered by a hash of their path) up to that size."""
    with zipfile.ZipFile(wheel) as z:
        infos = [i for i in z.infolist() if i.filename.endswith(".py") and not i.is_dir()
                 and not VENDOR_DIRS.intersection(i.filename.split("/")[:-1])]
        if max_bytes is not None:
            chosen, total = set(), 0
            for i in sorted(infos, key=lambda i: hashlib.sha256(i.filename.encode()).hexdigest()):
                if total + i.file_size <= max_bytes:
                    chosen.add(i.filename)
                    total += i.file_size
            infos = [i for i in infos if i.filename in chosen]
        docs = []
        for info in sorted(infos, key=lambda i: i.filename):
            text = decode_source(z.read(info))
            if text is not None:
                docs.append((info.filename, text))
    return docs


# ---- fetching ------------------------------------------------------------------------------


def requirements_text(pins: Iterable[Pin]) -> str:
    """A pip requirements file pinning every wheel by version and sha256."""
    return "".join(f"{p.name}=={p.version} --hash=sha256:{p.sha256}\n" for p in dict.fromkeys(pins))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _wheel_name(pin: Pin) -> re.Pattern:
    name = re.sub(r"[-_.]+", "[-_.]", pin.name)
    return re.compile(rf"^{name}-{re.escape(pin.version)}-.*\.whl$", re.IGNORECASE)


def find_wheel(pin: Pin, folder: Path) -> Path | None:
    """The downloaded wheel of `pin` in `folder` whose sha256 matches the pin, if any."""
    for path in sorted(folder.glob("*.whl")):
        if _wheel_name(pin).match(path.name) and sha256_file(path) == pin.sha256:
            return path
    return None


def fetch_wheels(pins: Iterable[Pin], folder: Path, index_url: str = PYPI_INDEX) -> dict[Pin, Path]:
    """Downloads the pinned wheels with pip (exact versions, `--require-hashes`) unless already there.

    pip runs isolated from user configuration (`--isolated`), so only `index_url` is used. Every file is
    checked against its pin again afterwards; a mismatch is an error naming the package."""
    pins = list(dict.fromkeys(pins))
    folder.mkdir(parents=True, exist_ok=True)
    missing = [p for p in pins if find_wheel(p, folder) is None]
    if missing:
        req = folder / "requirements.txt"
        write_text_atomic(req, requirements_text(missing))
        cmd = [sys.executable, "-m", "pip", "download", "--isolated", "--no-deps", "--only-binary", ":all:",
               "--platform", "any", "--implementation", "py", "--require-hashes", "--index-url", index_url,
               "-r", str(req), "-d", str(folder), "--quiet"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise RuntimeError(f"pip download of {len(missing)} pinned wheels failed: {last}")
    out = {}
    for p in pins:
        wheel = find_wheel(p, folder)
        if wheel is None:
            raise RuntimeError(f"{p.name}=={p.version}: no wheel in {folder} matches the pinned sha256 {p.sha256[:12]}...")
        out[p] = wheel
    return out


# ---- deduplication and split ---------------------------------------------------------------


def normalized_digest(text: str) -> str:
    """Hash of the text with trailing spaces and blank lines ignored (exact-duplicate detection)."""
    lines = (line.rstrip() for line in text.splitlines())
    return hashlib.sha256("\n".join(line for line in lines if line).encode("utf-8")).hexdigest()


def long_lines(text: str) -> set[str]:
    """The distinct stripped lines of at least NEAR_DUP_MIN_CHARS characters (near-duplicate detection)."""
    return {s for s in (line.strip() for line in text.splitlines()) if len(s) >= NEAR_DUP_MIN_CHARS}


@dataclass
class Document:
    source: str  # "stdlib" or "name==version"
    path: str
    text: str
    split: str  # "train", "val" (stdlib held-out) or "val_extra" (projects held-out)


def split_documents(sources: list[tuple[str, list[tuple[str, str]]]]) -> tuple[list[Document], dict]:
    """Assigns splits and removes duplicates; returns the kept documents and what was dropped, per source.

    Held-out documents are kept first, so a copy of a held-out file is what gets dropped; a training file
    sharing at least NEAR_DUP_FRACTION of its long lines with held-out files is dropped too."""
    docs = []
    for source, items in sources:
        for path, text in items:
            if source == "stdlib":
                split = "val" if is_stdlib_heldout(path) else "train"
            else:
                split = "val_extra" if hash_percent(f"{source.split('==')[0]}/{path}") < PACKAGE_VAL_PERCENT else "train"
            docs.append(Document(source, path, text, split))
    order = sorted(range(len(docs)), key=lambda i: docs[i].split == "train")  # held-out first, stable
    seen: set[str] = set()
    heldout_lines: set[str] = set()
    dropped: dict[str, dict[str, int]] = {}
    kept_idx = []
    for i in order:
        doc = docs[i]
        digest = normalized_digest(doc.text)
        reason = None
        if digest in seen:
            reason = "duplicate"
        elif doc.split == "train":
            lines = long_lines(doc.text)
            if lines and len(lines & heldout_lines) >= NEAR_DUP_FRACTION * len(lines):
                reason = "near_heldout"
        if reason:
            d = dropped.setdefault(doc.source, {"duplicate": 0, "near_heldout": 0})
            d[reason] += 1
            continue
        seen.add(digest)
        if doc.split != "train":
            heldout_lines |= long_lines(doc.text)
        kept_idx.append(i)
    return [docs[i] for i in sorted(kept_idx)], dropped


# ---- tokenizing ----------------------------------------------------------------------------


def _token_chunks(tokenizer, texts: list[str], eot: int, chunk: int = 256) -> Iterator[np.ndarray]:
    for start in range(0, len(texts), chunk):
        encs = tokenizer.encode_batch(texts[start : start + chunk], add_special_tokens=False)
        for enc in encs:
            yield np.asarray(enc.ids + [eot], dtype=np.uint16)


def build_corpus(out: Path, tokenizer_json: Path, wheels_dir: Path | None = None, pins: Iterable[Pin] = PACKAGES,
                 index_url: str = PYPI_INDEX, progress: bool = True) -> dict:
    """Fetches, deduplicates, splits and tokenizes the corpus into `out`; returns its meta (cached by key).

    The cache key covers the tokenizer, the Python version (its stdlib) and the pins: the same inputs
    rebuild nothing."""
    from tokenizers import Tokenizer
    from tqdm.auto import tqdm

    from ..model.tokenization import ENDOFTEXT

    pins = list(dict.fromkeys(pins))
    out = Path(out)
    tok_bytes = Path(tokenizer_json).read_bytes()
    key = hashlib.sha256(tok_bytes + platform.python_version().encode()
                         + json.dumps([asdict(p) for p in pins]).encode()).hexdigest()[:16]
    meta_path = out / "meta.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        if meta.get("key") == key and all((out / f"{s}.npy").is_file() for s in meta["tokens"]):
            return meta
    wheels = fetch_wheels(pins, Path(wheels_dir or out / "wheels"), index_url) if pins else {}
    sources = [("stdlib", stdlib_documents())]
    for pin in tqdm(pins, desc="reading wheels", disable=not progress):
        sources.append((f"{pin.name}=={pin.version}", wheel_documents(wheels[pin], pin.max_bytes)))
    docs, dropped = split_documents(sources)

    tokenizer = Tokenizer.from_str(tok_bytes.decode("utf-8"))
    eot = tokenizer.token_to_id(ENDOFTEXT)
    if eot is None or tokenizer.get_vocab_size() > 65536:
        raise ValueError(f"{tokenizer_json}: needs an {ENDOFTEXT} token and at most 65536 tokens (uint16 ids)")
    out.mkdir(parents=True, exist_ok=True)
    per_source: dict[str, dict] = {}
    tokens = {}
    for split in ("train", "val", "val_extra"):
        part = [d for d in docs if d.split == split]
        arrays = []
        bar = tqdm(total=len(part), desc=f"tokenizing {split}", disable=not progress)
        for doc, ids in zip(part, _token_chunks(tokenizer, [d.text for d in part], eot)):
            arrays.append(ids)
            s = per_source.setdefault(doc.source, {"files": {}, "tokens": {}, "bytes": 0})
            s["files"][split] = s["files"].get(split, 0) + 1
            s["tokens"][split] = s["tokens"].get(split, 0) + len(ids)
            s["bytes"] += len(doc.text.encode("utf-8"))
            bar.update()
        bar.close()
        array = np.concatenate(arrays) if arrays else np.zeros(0, dtype=np.uint16)
        with atomic_open(out / f"{split}.npy") as f:
            np.save(f, array)
        tokens[split] = int(len(array))
    meta = {
        "key": key,
        "python": platform.python_version(),
        "tokenizer_sha256": hashlib.sha256(tok_bytes).hexdigest(),
        "tokens": tokens,
        "sources": [
            {"name": "cpython-stdlib", "version": platform.python_version(), "license": "PSF-2.0",
             "sha256": None, **per_source.get("stdlib", {}), "dropped": dropped.get("stdlib", {})},
            *[{"name": p.name, "version": p.version, "license": p.license, "sha256": p.sha256,
               "max_bytes": p.max_bytes, **per_source.get(f"{p.name}=={p.version}", {}),
               "dropped": dropped.get(f"{p.name}=={p.version}", {})} for p in pins],
        ],
        "val_files": sorted(f"{d.source}/{d.path}" for d in docs if d.split != "train"),
        "rules": {"stdlib_val_percent": STDLIB_VAL_PERCENT, "package_val_percent": PACKAGE_VAL_PERCENT,
                  "near_duplicate": f">= {NEAR_DUP_FRACTION:.0%} of lines of >= {NEAR_DUP_MIN_CHARS} chars shared "
                                    "with held-out files", "vendored_dirs_skipped": sorted(VENDOR_DIRS)},
    }
    write_json_atomic(meta_path, meta, indent=1)
    return meta


def sources_table(meta: dict) -> str:
    """Markdown table of the corpus sources (name, version, licence, files, training tokens) for model cards."""
    lines = ["| source | version | licence | files | training tokens |", "|---|---|---|---|---|"]
    for s in meta["sources"]:
        files = sum(s.get("files", {}).values())
        lines.append(f"| {s['name']} | {s['version']} | {s['license']} | {files:,} | {s.get('tokens', {}).get('train', 0):,} |")
    return "\n".join(lines)
