"""The circuit_sparsity `tinypython_2k` tokenizer, read from its GPT-2 style "data gym" files
(`encoder.json` + `vocab.bpe`) and converted to a Hugging Face `tokenizer.json`.

The converted tokenizer gives exactly the ids of the reference's tiktoken encoding:
- the BPE model has `ignore_merges=True`, because tiktoken returns a pre-token that is itself in
  the vocabulary as one token without running any merges;
- every split of a token into two tokens is a merge (ordered by the rank of the merged token),
  because tiktoken merges *any* adjacent pair whose concatenation is a token, lowest rank first;
- the pre-tokenizer is tiktoken's split regex (isolated) followed by a regex-free ByteLevel map.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tiktoken
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

from ..utils.jsonio import atomic_path, write_json_atomic

TINYPYTHON_PAT_STR = (
    r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
ENDOFTEXT = "<|endoftext|>"
# Sanity bounds for a byte-level BPE vocabulary: real ones (GPT-2, o200k, tinypython) stay far below them, and a
# file past them (a merge chain building ever longer tokens, say) would take minutes to convert and then fail.
MAX_TOKEN_BYTES = 256
MAX_MERGES = 2_000_000
ENCODER_FILE = "encoder.json"
VOCAB_BPE_FILE = "vocab.bpe"


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map; also the alphabet of data gym files and of the
    `ByteLevel` pre-tokenizer, so tokens are stored in `tokenizer.json` in this form."""
    printable = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    extra = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(extra)}}


_BYTE_TO_UNICODE = bytes_to_unicode()


def token_bytes_to_string(token: bytes) -> str:
    return "".join(_BYTE_TO_UNICODE[b] for b in token)


def load_data_gym(tok_dir: str | Path) -> tuple[dict[bytes, int], dict[str, int]]:
    """Read `encoder.json` + `vocab.bpe` like `tiktoken.load.data_gym_to_mergeable_bpe_ranks`.

    Reimplemented rather than called: tiktoken caches *local* files by path under the temp dir, so a
    re-converted folder could silently give stale ranks, and it reports problems with bare asserts.
    Ranks are: the 256 single bytes in data gym order, then one per line of `vocab.bpe`. The special
    tokens are the `<|endoftext|>` entry of `encoder.json` (the reference's id 2047).
    """
    tok_dir = Path(tok_dir)
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"tokenizer directory not found: {tok_dir}")
    encoder_path, vocab_path = tok_dir / ENCODER_FILE, tok_dir / VOCAB_BPE_FILE
    for path in (encoder_path, vocab_path):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: file not found (a data gym tokenizer needs {ENCODER_FILE} and {VOCAB_BPE_FILE})")

    char_to_byte = {c: b for b, c in _BYTE_TO_UNICODE.items()}

    def decode(value: str, where: str) -> bytes:
        try:
            return bytes(char_to_byte[c] for c in value)
        except KeyError as e:
            raise ValueError(f"{where}: character {e.args[0]!r} is not in the byte-level alphabet") from None

    # single bytes first, in data gym order (printable bytes, then the others)
    ranks = {bytes([b]): i for i, b in enumerate(_BYTE_TO_UNICODE)}
    try:
        lines = vocab_path.read_text(encoding="utf-8").split("\n")
    except UnicodeDecodeError as e:
        raise ValueError(f"{vocab_path}: not UTF-8 text ({e})") from None
    if not lines[0].startswith("#"):
        raise ValueError(f"{vocab_path}: first line must be a '#version' header, got {lines[0][:40]!r}")
    if lines[-1] == "":
        lines.pop()
    for rank, line in enumerate(lines[1:], start=256):  # like tiktoken, a repeated merge leaves a gap
        parts, where = line.split(), f"{vocab_path}:{rank - 254}"
        if len(parts) != 2:
            raise ValueError(f"{where}: expected two space-separated tokens, got {line[:60]!r}")
        token = decode(parts[0], where) + decode(parts[1], where)
        if len(token) > MAX_TOKEN_BYTES:
            raise ValueError(f"{where}: merged token of {len(token)} bytes is longer than {MAX_TOKEN_BYTES} bytes; "
                             "not a plausible BPE vocabulary")
        ranks[token] = rank

    try:
        encoder = json.loads(encoder_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{encoder_path}: invalid JSON ({e})") from None
    if not isinstance(encoder, dict) or not all(isinstance(v, int) for v in encoder.values()):
        raise ValueError(f"{encoder_path}: expected a JSON object mapping token strings to integer ids")
    special_tokens = {ENDOFTEXT: encoder.pop(ENDOFTEXT)} if ENDOFTEXT in encoder else {}
    encoder.pop("<|startoftext|>", None)  # dropped by tiktoken too; the reference registers no such special
    encoder = {decode(k, str(encoder_path)): v for k, v in encoder.items()}

    # tiktoken asserts this: merge order (rank) and encoder ids must be the same numbering
    if encoder != ranks:
        diff = next((k for k in ranks if encoder.get(k) != ranks[k]), None) or next(k for k in encoder if k not in ranks)
        raise ValueError(
            f"{encoder_path}: inconsistent with {VOCAB_BPE_FILE} ({len(encoder)} vs {len(ranks)} tokens; "
            f"token {token_bytes_to_string(diff)!r} has id {encoder.get(diff)} but merge rank {ranks.get(diff)})"
        )
    if not special_tokens:
        special_tokens = {ENDOFTEXT: max(ranks.values()) + 1}
    elif special_tokens[ENDOFTEXT] in ranks.values():
        raise ValueError(f"{encoder_path}: {ENDOFTEXT} id {special_tokens[ENDOFTEXT]} is also a BPE token id")
    return ranks, special_tokens


def tiktoken_encoding(tok_dir: str | Path, name: str = "tinypython_2k") -> tiktoken.Encoding:
    """The reference's tiktoken encoding (same ranks, split pattern and special token)."""
    mergeable_ranks, special_tokens = load_data_gym(tok_dir)
    return tiktoken.Encoding(
        name, pat_str=TINYPYTHON_PAT_STR, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens
    )


def build_tokenizer_json(
    mergeable_ranks: dict[bytes, int], special_tokens: dict[str, int], pat_str: str = TINYPYTHON_PAT_STR
) -> Tokenizer:
    """A `tokenizers.Tokenizer` that encodes like `tiktoken.Encoding(pat_str, mergeable_ranks, special_tokens)`.

    Works for any ranks (not only ones produced by BPE training): a merge is listed for every split
    of a token into two tokens, so each adjacent pair tiktoken could merge is mergeable in HF too,
    with the same priority (the merged token's rank). Remaining difference, only in theory: when two
    *different* splits of one token are adjacent at once, tiktoken takes the leftmost, HF the split
    listed first (lower-ranked left part).
    """
    vocab = {token_bytes_to_string(token): rank for token, rank in mergeable_ranks.items()}
    merges = []
    for token, rank in sorted(mergeable_ranks.items(), key=lambda kv: kv[1]):
        splits = [(token[:i], token[i:]) for i in range(1, len(token))]
        splits = [(a, b) for a, b in splits if a in mergeable_ranks and b in mergeable_ranks]
        splits.sort(key=lambda ab: (mergeable_ranks[ab[0]], mergeable_ranks[ab[1]]))
        merges += [(token_bytes_to_string(a), token_bytes_to_string(b)) for a, b in splits]
        if len(merges) > MAX_MERGES:
            raise ValueError(f"the vocabulary's tokens split into more than {MAX_MERGES:,} merges; not a plausible BPE vocabulary")

    # An added token gets id len(vocab) unless the model vocab already has it: put a special token
    # in the model vocab only when its id is not that next free id.
    added = []
    for token, token_id in sorted(special_tokens.items(), key=lambda kv: kv[1]):
        if token_id in mergeable_ranks.values():
            raise ValueError(f"special token {token!r} id {token_id} is also a BPE token id")
        if token_id != len(vocab) + len(added):
            vocab[token] = token_id
        added.append(token)

    tokenizer = Tokenizer(models.BPE(vocab, merges, ignore_merges=True, fuse_unk=False, byte_fallback=False))
    tokenizer.normalizer = None
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pat_str), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    for token, token_id in special_tokens.items():
        if tokenizer.token_to_id(token) != token_id:
            raise ValueError(f"special token {token!r} got id {tokenizer.token_to_id(token)}, expected {token_id}")
    return tokenizer


def save_hf_tokenizer(tokenizer: Tokenizer, dst_dir: str | Path, model_max_length: int | None = None) -> Path:
    """Write `tokenizer.json`, `tokenizer_config.json` and `special_tokens_map.json` so that
    `AutoTokenizer.from_pretrained(dst_dir)` loads it offline. Like GPT-2, `<|endoftext|>` is bos, eos,
    unk and pad, and no special token is ever added by `encode`/`__call__` (the models were trained
    on raw tiktoken ids)."""
    dst_dir = Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    with atomic_path(dst_dir / "tokenizer.json") as tmp:
        tokenizer.save(str(tmp))

    has_eot = tokenizer.token_to_id(ENDOFTEXT) is not None
    special_map = {k: ENDOFTEXT for k in ("bos_token", "eos_token", "unk_token", "pad_token")} if has_eot else {}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special_map,
        "add_bos_token": False,
        "add_eos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
    }
    if model_max_length is not None:
        config["model_max_length"] = int(model_max_length)
    write_json_atomic(dst_dir / "tokenizer_config.json", config, indent=2)
    write_json_atomic(dst_dir / "special_tokens_map.json", special_map, indent=2)
    return dst_dir


# ---- tokens as text -------------------------------------------------------------------------
# A byte-level BPE token need not hold whole UTF-8 characters ("é" can be two tokens of one byte each), so decoding a
# token alone gives U+FFFD. These give each token's text without that loss, for every view that draws tokens.

_UNICODE_TO_BYTE = {c: b for b, c in _BYTE_TO_UNICODE.items()}
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece-style byte tokens


def byte_escape(data: bytes) -> str:
    """Bytes that form no whole character, as visible escapes: b"\\xe6\\x97" -> "⟨e6⟩⟨97⟩"."""
    return "".join(f"⟨{b:02x}⟩" for b in data)


def token_pieces(tokenizer: Any, ids: Iterable[int]) -> list[bytes | str]:
    """Each token's bytes, or its text for a special token (and `<id>` for an id the tokenizer does not have).

    Works from the vocabulary, not from `decode` (which turns a partial character into U+FFFD): a byte-level
    tokenizer's token string maps back through GPT-2's byte alphabet; a tiktoken `Encoding` gives the bytes
    itself; any other tokenizer falls back to `decode([id])` (with `<0xXX>` byte tokens read as bytes)."""
    ids = [int(i) for i in ids]
    if hasattr(tokenizer, "decode_single_token_bytes"):  # tiktoken.Encoding
        out: list[bytes | str] = []
        for i in ids:
            try:
                out.append(tokenizer.decode_single_token_bytes(i))
            except (KeyError, ValueError, OverflowError):
                out.append(f"<{i}>")
        return out
    added = {int(i): str(t) for i, t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items()}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    char_to_byte = getattr(tokenizer, "byte_decoder", None)  # slow GPT-2 style tokenizers
    if char_to_byte is None and isinstance(getattr(backend, "decoder", None), decoders.ByteLevel):
        char_to_byte = _UNICODE_TO_BYTE
    strings = tokenizer.convert_ids_to_tokens([i if i >= 0 else 0 for i in ids])
    out = []
    for i, s in zip(ids, strings):
        if i < 0 or s is None:
            out.append(f"<{i}>")
        elif i in added:
            out.append(added[i])
        elif char_to_byte is not None and all(c in char_to_byte for c in s):
            out.append(bytes(char_to_byte[c] for c in s))
        elif (m := _BYTE_FALLBACK.fullmatch(s)) is not None:
            out.append(bytes([int(m.group(1), 16)]))
        else:
            try:
                out.append(tokenizer.decode([i]).encode("utf-8"))
            except Exception:  # a tokenizer that cannot decode this id alone: still a label
                out.append(f"<{i}>")
    return out


def texts_of_pieces(pieces: Sequence[bytes | str]) -> list[str]:
    """`token_texts` for pieces from `token_pieces`: each UTF-8 character on the token holding its last byte;
    a byte that forms no whole character with its neighbours as `byte_escape`, on its own token. A special
    token (a `str` piece) is its text and joins no bytes across it."""
    out = [piece if isinstance(piece, str) else "" for piece in pieces]
    data, origin = bytearray(), []

    def flush():
        p = 0
        while p < len(data):
            for width in range(1, min(4, len(data) - p) + 1):  # UTF-8 is prefix-free: at most one width decodes
                try:
                    char = bytes(data[p:p + width]).decode("utf-8")
                except UnicodeDecodeError:
                    continue
                out[origin[p + width - 1]] += char
                p += width
                break
            else:
                out[origin[p]] += byte_escape(bytes(data[p:p + 1]))
                p += 1
        data.clear()
        origin.clear()

    for n, piece in enumerate(pieces):
        if isinstance(piece, str):
            flush()
        else:
            data += piece
            origin += [n] * len(piece)
    flush()
    return out


def token_texts(tokenizer: Any, ids: Iterable[int]) -> list[str]:
    """The text of each token of a sequence, so that the texts joined are the decoded sequence exactly.

    A character whose bytes span several tokens is shown on the token that completes it (where a causal model
    has read all of it); the tokens before show "" for those bytes. Bytes that form no whole character even
    with their neighbours (a window cut inside a character) are shown as `⟨e9⟩` escapes. Never U+FFFD, unless
    the text holds U+FFFD itself."""
    return texts_of_pieces(token_pieces(tokenizer, ids))


def token_text(tokenizer: Any, token_id: int) -> str:
    """One token out of context (vocabulary and top-k lists): its whole characters as text, the bytes of a
    partial character as `⟨e9⟩` escapes."""
    return texts_of_pieces(token_pieces(tokenizer, [token_id]))[0]
