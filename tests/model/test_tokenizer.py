"""The converted `tinypython_2k` tokenizer must give exactly tiktoken's ids and decode losslessly."""

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tiktoken
from transformers import AutoTokenizer

from conversion.convert_tokenizer import convert_tokenizer, main
from modeling_csp.model.tokenization import (
    ENDOFTEXT,
    TINYPYTHON_PAT_STR,
    build_tokenizer_json,
    load_data_gym,
    tiktoken_encoding,
    token_text,
    token_texts,
)

PROJECT_ROOT = Path(__file__).resolve().parents[2]
TOK_DIR = PROJECT_ROOT.parent / "shared" / "fixtures" / "tokenizer_tinypython_like"
REFERENCE = json.loads((TOK_DIR / "reference.json").read_text(encoding="utf-8"))
CASES = REFERENCE["cases"]
DEFAULT_MODEL_DIR = PROJECT_ROOT / "modeling_csp" / "default_model"
MIXED = 's = "héllo wörld 日本語 🙂'  # characters of 2, 3 and 4 UTF-8 bytes


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """Converted through the command line, as a user would."""
    dst = tmp_path_factory.mktemp("tinypython_hf")
    result = subprocess.run(
        [sys.executable, "-m", "conversion.convert_tokenizer", str(TOK_DIR), str(dst), "--model-max-length", "1024"],
        cwd=PROJECT_ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr
    return dst


@pytest.fixture(scope="module")
def hf_tok(hf_dir):
    return AutoTokenizer.from_pretrained(hf_dir)


@pytest.fixture(scope="module")
def enc():
    return tiktoken_encoding(TOK_DIR)


def hf_encode(tok, text, contains_special):
    # tiktoken's encode_ordinary reads "<|endoftext|>" as plain text; HF needs split_special_tokens for that
    return tok(text, split_special_tokens=not contains_special)["input_ids"]


def random_texts(n, seed=0):
    rng = random.Random(seed)
    corpus = "".join(case["text"] for case in CASES)
    odd = list(" \t\n\r\x0b\x0c\x85\xa0\u1680\u2003\u2028\u202f\u3000\u200b/'1٣Ⅻ²éé日🎉\x00") + [ENDOFTEXT]
    texts = []
    for i in range(n):
        if i % 3 == 0:
            start = rng.randrange(len(corpus))
            texts.append(corpus[start : start + rng.randrange(1, 120)])
        elif i % 3 == 1:
            texts.append("".join(rng.choice(odd + list("ab_(). =:\n")) for _ in range(rng.randrange(1, 30))))
        else:
            cps = (rng.randrange(0x110000) if rng.random() < 0.3 else rng.randrange(0x300) for _ in range(20))
            texts.append("".join(chr(c) for c in cps if not 0xD800 <= c < 0xE000))
    return texts


def test_reference_metadata():
    ranks, special = load_data_gym(TOK_DIR)
    assert REFERENCE["pat_str"] == TINYPYTHON_PAT_STR
    assert special == {ENDOFTEXT: REFERENCE["eot_id"]} == {ENDOFTEXT: 2047}
    assert sorted(ranks.values()) == list(range(len(ranks)))


@pytest.mark.parametrize("case", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_hf_ids_and_decode_match_reference(hf_tok, case):
    ids = hf_encode(hf_tok, case["text"], case.get("contains_special", False))
    assert ids == case["ids"]
    assert hf_tok.decode(ids) == case["text"]


def test_tiktoken_encoding_matches_reference(enc):
    for case in CASES:
        if case.get("contains_special", False):
            assert enc.encode(case["text"], allowed_special="all") == case["ids"]
        else:
            assert enc.encode_ordinary(case["text"]) == case["ids"]


def test_no_special_tokens_added_and_config(hf_tok, hf_dir, enc):
    text = "x = 1\n"
    assert hf_tok(text)["input_ids"] == hf_tok.encode(text) == enc.encode_ordinary(text)
    assert hf_tok.eos_token == hf_tok.bos_token == hf_tok.pad_token == ENDOFTEXT
    assert hf_tok.eos_token_id == 2047 and len(hf_tok) == 2048
    assert hf_tok.model_max_length == 1024
    config = json.loads((hf_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["add_bos_token"] is False
    assert json.loads((hf_dir / "special_tokens_map.json").read_text())["eos_token"] == ENDOFTEXT


def test_literal_endoftext(hf_tok, enc):
    text = f"a{ENDOFTEXT}b"
    assert hf_tok(text)["input_ids"] == enc.encode(text, allowed_special="all")
    assert hf_tok(text, split_special_tokens=True)["input_ids"] == enc.encode_ordinary(text)
    assert 2047 not in enc.encode_ordinary(text)


def test_random_text_parity(hf_tok, enc):
    for text in random_texts(600):
        assert hf_tok(text, split_special_tokens=True)["input_ids"] == enc.encode_ordinary(text), repr(text)
        assert hf_tok(text)["input_ids"] == enc.encode(text, allowed_special="all"), repr(text)
        assert hf_tok.decode(enc.encode_ordinary(text)) == text


def test_build_works_for_arbitrary_ranks():
    """Merges are derived from ranks alone: a random re-ranking of the vocabulary (not a BPE
    training order, bytes not first, special token not last) still matches tiktoken exactly."""
    ranks, _ = load_data_gym(TOK_DIR)
    tokens = list(ranks)
    random.Random(1).shuffle(tokens)
    shuffled = {token: i for i, token in enumerate(tokens)}
    special = {ENDOFTEXT: len(tokens) + 5}
    ref = tiktoken.Encoding("shuffled", pat_str=TINYPYTHON_PAT_STR, mergeable_ranks=shuffled, special_tokens=special)
    tok = build_tokenizer_json(shuffled, special, TINYPYTHON_PAT_STR)
    for text in [case["text"] for case in CASES] + random_texts(300, seed=2):
        assert tok.encode(text, add_special_tokens=False).ids == ref.encode(text, allowed_special="all")
    assert tok.token_to_id(ENDOFTEXT) == len(tokens) + 5


@pytest.fixture
def tok_copy(tmp_path):
    dst = tmp_path / "tok"
    dst.mkdir()
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(TOK_DIR / name, dst / name)
    return dst


def test_missing_dir_and_file(tmp_path, tok_copy):
    with pytest.raises(FileNotFoundError, match="directory not found"):
        load_data_gym(tmp_path / "nope")
    (tok_copy / "vocab.bpe").unlink()
    with pytest.raises(FileNotFoundError, match=r"vocab\.bpe: file not found"):
        convert_tokenizer(tok_copy, tmp_path / "out")


def test_malformed_files(tok_copy):
    encoder = tok_copy / "encoder.json"
    good = encoder.read_text(encoding="utf-8")
    encoder.write_text(good[:-10], encoding="utf-8")
    with pytest.raises(ValueError, match=r"encoder\.json: invalid JSON"):
        load_data_gym(tok_copy)
    data = json.loads(good)
    data["Ġ"], data["!"] = data["!"], data["Ġ"]
    encoder.write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(ValueError, match=r"encoder\.json: inconsistent with vocab\.bpe"):
        load_data_gym(tok_copy)
    encoder.write_text(good, encoding="utf-8")
    with open(tok_copy / "vocab.bpe", "a", encoding="utf-8") as f:
        f.write("onlyone\n")
    with pytest.raises(ValueError, match=r"vocab\.bpe:\d+: expected two"):
        load_data_gym(tok_copy)


def test_cli_errors(tmp_path, tok_copy, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err.strip() == f"error: tokenizer directory not found: {tmp_path / 'nope'}"

    (tok_copy / "encoder.json").write_text("{not json", encoding="utf-8")
    result = subprocess.run(
        [sys.executable, "-m", "conversion.convert_tokenizer", str(tok_copy), str(tmp_path / "out")],
        cwd=PROJECT_ROOT, capture_output=True, text=True,
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "encoder.json: invalid JSON" in lines[0]
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_an_absurd_merge_chain_is_refused_at_once(tmp_path):
    """A chain 'a a', 'aa a', 'aaa a', ... builds ever longer tokens; converting it once took minutes, then failed."""
    chain = ["#version: 0.2"] + ["a" * n + " a" for n in range(1, 400)]
    (tmp_path / "vocab.bpe").write_text("\n".join(chain) + "\n", encoding="utf-8")
    (tmp_path / "encoder.json").write_text("{}", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.bpe:\d+: merged token of 257 bytes is longer than 256 bytes"):
        load_data_gym(tmp_path)


def test_a_tokenizer_larger_than_the_models_vocabulary_is_refused(tmp_path):
    with pytest.raises(ValueError, match="tokenizer has ids up to 2047 but the model's vocab_size is 512"):
        convert_tokenizer(TOK_DIR, tmp_path / "out", vocab_size=512)
    assert main([str(TOK_DIR), str(tmp_path / "out"), "--vocab-size", "512"]) == 2


# ---- tokens as text -------------------------------------------------------------------------------


def shown_bytes(text):
    """The bytes a token text stands for: its characters in UTF-8, each `⟨e9⟩` escape as that byte."""
    parts = re.split(r"⟨([0-9a-f]{2})⟩", text)
    return b"".join(bytes.fromhex(p) if i % 2 else p.encode("utf-8") for i, p in enumerate(parts))


@pytest.fixture(scope="module")
def default_tok():
    if not (DEFAULT_MODEL_DIR / "tokenizer.json").is_file():
        pytest.skip("no default model installed (modeling_csp/default_model)")
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


def test_token_texts_join_back_to_the_text_without_replacement_characters(default_tok):
    ids = default_tok.encode(MIXED, add_special_tokens=False)
    texts = token_texts(default_tok, ids)
    assert "".join(texts) == MIXED and not any("\ufffd" in t for t in texts)
    assert len(texts) == len(ids) and {"é", "ö", "🙂"} <= set(texts)  # each character on the token completing it
    assert any(t == "" for t in texts)  # tokens that only start a character show nothing of their own
    alone = [token_text(default_tok, i) for i in ids]  # out of context: partial characters as escapes
    assert not any("\ufffd" in t for t in alone) and any("⟨" in t for t in alone)
    assert b"".join(shown_bytes(t) for t in alone) == MIXED.encode("utf-8")
    assert [t for t in alone if "⟨" not in t] == [t for t, a in zip(texts, alone) if "⟨" not in a]


def test_token_texts_escape_bytes_cut_from_their_character(default_tok):
    ids = default_tok.encode("日本", add_special_tokens=False)
    head, tail = (shown_bytes(token_text(default_tok, i)) for i in (ids[0], ids[-1]))
    assert len(ids) >= 3 and len(head) < 3 and len(tail) < 3  # the characters span several tokens
    texts = token_texts(default_tok, ids[1:-1])  # a window that starts and ends inside a character
    assert "⟨" in texts[0] and "⟨" in texts[-1] and not any("\ufffd" in t for t in texts)
    assert head + b"".join(shown_bytes(t) for t in texts) + tail == "日本".encode("utf-8")
    eot = default_tok.convert_tokens_to_ids(ENDOFTEXT)
    split = token_texts(default_tok, ids[:1] + [eot] + ids[1:])  # a special token joins no bytes across it
    assert split[1] == ENDOFTEXT and "⟨" in split[0] and "".join(split[1:]).startswith(ENDOFTEXT + "⟨")
    real = default_tok.encode("a\ufffdb", add_special_tokens=False)  # the text's own U+FFFD stays
    assert "".join(token_texts(default_tok, real)) == "a\ufffdb"
    assert token_texts(default_tok, [-1, len(default_tok) + 5]) == ["<-1>", f"<{len(default_tok) + 5}>"]


def test_token_texts_of_the_fixture_tokenizer_match_tiktoken_bytes(hf_tok, enc):
    """The converted tokenizer and tiktoken's `Encoding` show the same texts, whose bytes are tiktoken's exactly."""
    for text in [MIXED] + [case["text"] for case in CASES] + random_texts(60, seed=1):
        ids = enc.encode_ordinary(text)
        texts = token_texts(hf_tok, ids)
        assert texts == token_texts(enc, ids) and "".join(texts) == text
    for i in range(enc.n_vocab - 1):  # every ordinary token alone
        assert shown_bytes(token_text(hf_tok, i)) == enc.decode_single_token_bytes(i), i
    assert token_text(hf_tok, enc.eot_token) == ENDOFTEXT
