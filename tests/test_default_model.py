"""The shipped default model (modeling_csp/default_model/) loads through the Auto classes and is sane.

The folder is produced by scripts/train_default_tokenizer.py + scripts/train_default_model.py.
"""

import json
import os
import random
import sysconfig
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

FOLDER = Path(__file__).resolve().parents[1] / "modeling_csp" / "default_model"
TARGET_DENSITY, BIGRAM_DENSITY = 0.05, 0.02
DOCUMENTED_CONFIG = dict(
    block_size=128, vocab_size=2048, n_layer=2, n_head=8, d_head=16, d_model=128, d_mlp=512,
    bias=False, ln_bias=False, rms_norm=True, residual_activation_type="identity", activation_type="gelu",
    afrac=0.25, afrac_loctypes="attn_in,attn_out,mlp_in,mlp_out", tied_unembed=False,
    enable_bigram_table=True, learnable_bigram_table=True, sink=True, d_pos_emb=None,
)
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(2)
    return AutoModelForCausalLM.from_pretrained(str(FOLDER), trust_remote_code=True).eval()


@pytest.fixture(scope="module")
def tokenizer():
    # trust_remote_code only silences the prompt AutoTokenizer shows while it reads config.json
    return AutoTokenizer.from_pretrained(str(FOLDER), trust_remote_code=True)


@pytest.fixture(scope="module")
def record():
    return json.loads((FOLDER / "training_curve.json").read_text())


def test_folder_contents():
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "configuration_csp.py", "modeling_csp.py", "training_curve.json"):
        assert (FOLDER / name).is_file(), f"{name} missing from {FOLDER}"
    size = sum(f.stat().st_size for f in FOLDER.iterdir() if f.is_file())
    assert size < 5_000_000, f"default model folder is {size / 1e6:.1f} MB"
    with safe_open(str(FOLDER / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        # every weight matrix and the bigram table are stored as (values, indices)
        assert "bigram_table.sparse_indices" in keys and "lm_head.weight.sparse_indices" in keys
        assert f.get_tensor("bigram_table.sparse_indices").numel() > 0


def test_config_is_documented(model):
    config = model.config
    assert config.model_type == "csp"
    for key, value in DOCUMENTED_CONFIG.items():
        assert getattr(config, key) == value, f"config.{key} = {getattr(config, key)!r}, documented {value!r}"
    assert type(model).__name__ == "CSPForCausalLM"


def test_weights_are_sparse(model):
    for name, p in model.named_parameters():
        if p.ndim != 2:
            continue
        target = BIGRAM_DENSITY if name == "bigram_table" else TARGET_DENSITY
        density = int(p.count_nonzero()) / p.numel()
        assert density <= target + 1e-3, f"{name}: density {density:.4f} > target {target}"
        assert density > 0.5 * target, f"{name}: density {density:.4f}, far below target {target}"


def test_tokenizer(tokenizer):
    assert len(tokenizer) == 2048
    assert tokenizer.convert_tokens_to_ids(EOT) == 2047 == tokenizer.eos_token_id
    text = "def f(x):\n    return {'a': x, \"b\": [1, 2]}  # ok\n"
    ids = tokenizer(text)["input_ids"]
    assert EOT not in tokenizer.convert_ids_to_tokens(ids)  # no special tokens added on encode
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(list(b"abc ")) == "abc "  # ids 0..255 are the bytes, id == byte value
    assert all(len(t) == 1 for t in tokenizer.convert_ids_to_tokens(list(range(256))))


def _held_out_tokens(tokenizer, record):
    """The held-out stdlib files (the recorded val split) as found in this Python's stdlib, joined by EOT."""
    root = Path(sysconfig.get_paths()["stdlib"])
    eot = tokenizer.convert_tokens_to_ids(EOT)
    ids = []
    for name in record["data"]["val_files"]:
        path = root / name
        if path.is_file():
            try:
                ids += tokenizer(path.read_text(encoding="utf-8"), verbose=False)["input_ids"] + [eot]
            except UnicodeDecodeError:
                pass
    return ids


def test_val_loss(model, tokenizer, record):
    ids = _held_out_tokens(tokenizer, record)
    if len(ids) < 8 * 129:
        pytest.skip("the recorded held-out stdlib files are not present in this Python's stdlib")
    tokens = torch.tensor(ids)
    n_windows = (len(tokens) - 1) // 128
    starts = torch.linspace(0, n_windows - 1, 32).round().long() * 128
    windows = torch.stack([tokens[s : s + 129] for s in starts.tolist()])
    with torch.no_grad():
        loss = float(model(windows[:, :-1], targets=windows[:, 1:], use_cache=False).loss)
    # 32 windows spread over the held-out files; the full held-out set gives record["final"]["val_loss"]
    assert loss < 4.4, f"held-out loss {loss:.3f} nats/token"
    assert abs(loss - record["final"]["val_loss"]) < 0.25, "the shipped weights do not match the recorded curve"


WORDS = (
    "hello world value name file path data error line text item list key result number message "
    "config user default time start end open close read write input output string count index "
    "module class function method object type format return local global option field table row "
    "column header body title label status state mode level size length width height color green "
    "blue red apple house tree river cloud water fire stone light dark quick brown fox lazy dog"
).split()
NAMES = "x y s msg name text label key result value title prefix sep line word out path".split()


def _quote_prompts(n, seed):
    """Same generator as scripts/check_default_model.py: `x = 'abc def` -> `'`, `print("hi there` -> `"`."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        q = "'" if i % 2 == 0 else '"'
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4)))
        v = rng.choice(NAMES)
        template = rng.randrange(5)
        prompt = [
            f"{v} = {q}{words}",
            f"print({q}{words}",
            f"def f({v}):\n    return {q}{words}",
            f"{v}.append({q}{words}",
            f"raise ValueError({q}{words}",
        ][template]
        out.append((prompt, q))
    return out


def test_quote_matching(model, tokenizer):
    quote_ids = {q: tokenizer.convert_tokens_to_ids(q) for q in ("'", '"')}
    correct = kept = 0
    for prompt, q in _quote_prompts(120, seed=1234):
        ids = tokenizer(prompt)["input_ids"]
        if tokenizer(prompt + q)["input_ids"] != ids + [quote_ids[q]]:
            continue  # the quote is not a single token after this prompt
        with torch.no_grad():
            logits = model(torch.tensor([ids]), use_cache=False).logits[0, -1]
        other = "'" if q == '"' else '"'
        correct += bool(logits[quote_ids[q]] > logits[quote_ids[other]])
        kept += 1
    assert kept >= 100
    accuracy = correct / kept
    assert accuracy >= 0.85, f"quote matching accuracy {accuracy:.3f} on {kept} prompts"


def test_generate_runs(model, tokenizer):
    ids = tokenizer("import os\n\ndef ", return_tensors="pt")["input_ids"]
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert out.shape == (1, ids.shape[1] + 8)


@pytest.mark.parametrize("name", ["modeling_csp.py", "configuration_csp.py"])
def test_remote_code_is_the_package_code(name):
    """The folder's remote code is what the package runs, so both give the same numbers."""
    package = Path(__file__).resolve().parents[1] / "modeling_csp" / name
    assert (FOLDER / name).read_text() == package.read_text(), f"re-copy {package} into {FOLDER}"
