"""Shared test helpers: where the reference fixtures are, converted copies of them, the fixture tokenizer as tiktoken,
and the app's test circuit."""

import contextlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
FIXTURES = PROJECT_ROOT.parent / "shared" / "fixtures"
CHECKPOINTS = ["ln_gpt2", "rms_sink_bigram", "catpos_relu_bf16"]
TOKENIZER_FIXTURE = FIXTURES / "tokenizer_tinypython_like"
# GPT-2's pre-tokenizer pattern, as tiktoken reads it
TIKTOKEN_PATTERN = r"""[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"""

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def pytest_configure(config):
    if not FIXTURES.is_dir():
        raise pytest.UsageError(f"reference fixtures not found at {FIXTURES}: put shared/ beside the project root")


@pytest.fixture(scope="session")
def fixture_tiktoken():
    """tinypython_2k-like tiktoken encoding built offline from data-gym files (`get_encoding` needs network)."""
    tiktoken_load = pytest.importorskip("tiktoken.load")
    import tiktoken

    if not (TOKENIZER_FIXTURE / "vocab.bpe").exists():
        pytest.skip(f"tokenizer fixture not found at {TOKENIZER_FIXTURE}")
    ranks = tiktoken_load.data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(TOKENIZER_FIXTURE / "vocab.bpe"), encoder_json_file=str(TOKENIZER_FIXTURE / "encoder.json")
    )
    return tiktoken.Encoding(
        "tinypython_like", pat_str=TIKTOKEN_PATTERN, mergeable_ranks=ranks,
        special_tokens={"<|endoftext|>": 2047},  # the vocabulary's last id
    )


def truncated_tokenizer(n_ids: int, dst: Path) -> Path:
    """The fixture tokenizer cut to its first `n_ids` ids (the first merges, `<|endoftext|>` last): a real
    data-gym tokenizer that fits the fixture checkpoints' small vocabularies."""
    import json

    encoder = json.loads((TOKENIZER_FIXTURE / "encoder.json").read_text(encoding="utf-8"))
    merges = (TOKENIZER_FIXTURE / "vocab.bpe").read_text(encoding="utf-8").split("\n")
    dst.mkdir(parents=True, exist_ok=True)
    kept = {token: i for token, i in encoder.items() if i < n_ids - 1 and token != "<|endoftext|>"}
    (dst / "encoder.json").write_text(json.dumps({**kept, "<|endoftext|>": n_ids - 1}), encoding="utf-8")
    (dst / "vocab.bpe").write_text("\n".join(merges[: 1 + n_ids - 1 - 256]) + "\n", encoding="utf-8")
    return dst


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """Converts each fixture checkpoint once per session, with the fixture tokenizer cut to its vocabulary:
    name -> converted folder."""
    import json

    from conversion.convert_checkpoint import convert_checkpoint

    root = tmp_path_factory.mktemp("converted")
    folders = {}
    for name in CHECKPOINTS:
        vocab_size = json.loads((FIXTURES / name / "beeg_config.json").read_text())["vocab_size"]
        # 256 ids hold the byte alphabet and no <|endoftext|>: that checkpoint gets no tokenizer
        tokenizer = truncated_tokenizer(vocab_size, root / f"tokenizer_{vocab_size}") if vocab_size > 257 else None
        folders[name] = convert_checkpoint(str(FIXTURES / name), root / name, tokenizer_dir=tokenizer and str(tokenizer))
    return folders


@pytest.fixture(scope="module")
def models(converted):
    """name -> the converted fixture checkpoint, loaded once per test module, in eval mode."""
    from modeling_csp import CSPForCausalLM

    return {name: CSPForCausalLM.from_pretrained(converted[name]).eval() for name in CHECKPOINTS}


def random_ids(model, n=2, T=16, seed=0):
    """(n, T) token ids drawn uniformly from the model's vocabulary."""
    import torch

    return torch.randint(0, model.config.vocab_size, (n, T), generator=torch.Generator().manual_seed(seed))


# The released models' choices: attention sink, AbsTopK, a learnable bigram table, RMSNorm, untied unembedding.
SHIPPED_CHOICES = dict(sink=True, afrac=0.5, enable_bigram_table=True, learnable_bigram_table=True, rms_norm=True,
                       tie_word_embeddings=False, bias=False, ln_bias=False)


def tiny_model(density: float = 0.05, seed: int = 0, **choices):
    """A 2-layer, 99-token model with the shipped choices (overridable) whose linear weights keep `density` of their
    entries, so that the sparse kernels are in use, and a random bigram table, sink logits and logit bias, so that
    they matter."""
    import torch

    from modeling_csp import CSPConfig, CSPForCausalLM

    torch.manual_seed(seed)
    config = CSPConfig(vocab_size=99, d_model=32, n_layer=2, n_head=4, d_mlp=48, block_size=64,
                       **(SHIPPED_CHOICES | choices))
    model = CSPForCausalLM(config).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if weight.ndim == 2 and "wte" not in name and "wpe" not in name and "bigram" not in name:
                weight.mul_(torch.rand_like(weight) < density)
        if model.bigram_table is not None:
            model.bigram_table.normal_()
        for block in model.transformer.h if model.config.sink else ():  # nonzero, so that the sink is tested
            block.attn.attn_imp.sink_logit.normal_()
        model.final_logits_bias.normal_()
    return model


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest single-threaded, and multi-threaded runs stall on a busy machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def rms_model(converted):
    """The converted `rms_sink_bigram` checkpoint (the paper's layout), loaded once per test module."""
    from modeling_csp import CSPForCausalLM

    return CSPForCausalLM.from_pretrained(converted["rms_sink_bigram"]).eval()


def synthetic_batch(model, n=32, T=16, seed=0):
    """Random prompts; the correct candidate is the full model's favourite of two random tokens."""
    import torch

    from modeling_csp.circuits.ablation import task_logits
    from modeling_csp.circuits.tasks import TaskBatch

    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (n, T), generator=g)
    pair = torch.randint(0, model.config.vocab_size, (n, 2), generator=g)
    batch = TaskBatch(ids, torch.ones_like(ids), torch.full((n,), T - 1), pair[:, 0], pair[:, 1])
    with torch.no_grad():
        logits = task_logits(model, batch)
    better = logits.gather(1, pair[:, :1]) >= logits.gather(1, pair[:, 1:])
    batch.correct_ids = torch.where(better[:, 0], pair[:, 0], pair[:, 1])
    batch.alternative_ids = torch.where(better[:, 0], pair[:, 1], pair[:, 0])
    return batch


TEST_TASK = "single_double_quote"


def app_test_model() -> str | None:
    """The model the app and explorer tests use: $CSP_APP_TEST_MODEL, else the embedded default model."""
    if os.environ.get("CSP_APP_TEST_MODEL"):
        return os.environ["CSP_APP_TEST_MODEL"]
    from modeling_csp.model.loading import DEFAULT_MODEL_DIR

    return "default" if (DEFAULT_MODEL_DIR / "config.json").is_file() else None


def build_test_circuit(spec: str, out: Path) -> Path:
    """A small connected circuit for TEST_TASK: the endpoints of each weight matrix's largest entries, with live
    node importances and layer deltas (mean ablation), saved as a csp-circuit file."""
    import torch

    from modeling_csp.circuits.ablation import compute_mean_activations
    from modeling_csp.circuits.evaluation import layer_ablation_deltas, node_importances
    from modeling_csp.circuits.graph import CircuitGraph, location_width, node_locations, weight_pairs
    from modeling_csp.model.loading import load_model_and_tokenizer
    from modeling_csp.circuits.tasks import make_task_dataset

    model, tokenizer = load_model_and_tokenizer(spec)
    masks = {loc: torch.zeros(location_width(model.config, loc), dtype=torch.bool) for loc in node_locations(model.config)}
    for layer in range(model.config.n_layer):
        for src, tgt, w in weight_pairs(model, layer):
            top = w.abs().flatten().topk(3 if model.config.n_layer <= 2 else 2).indices  # well under 128 nodes
            for flat in top.tolist():
                t, s = divmod(flat, w.shape[1])
                masks[src][s] = True
                masks[tgt][t] = True
    data = make_task_dataset(TEST_TASK, tokenizer, n=64, seed=0, max_len=model.config.block_size)
    means = compute_mean_activations(model, tokenizer)
    with torch.no_grad():
        imps = node_importances(model, data.test, masks, means)
        deltas = layer_ablation_deltas(model, data.test, masks, means)
    circuit = CircuitGraph.from_masks(model, masks, imps, model_name=spec, task=TEST_TASK, layer_deltas=deltas,
                                      meta={"options": {"n_examples": 64, "data_seed": 0}, "note": "test circuit"})
    return circuit.save(out)


@pytest.fixture(scope="session")
def test_circuit(tmp_path_factory):
    """(model spec, path of a small circuit for TEST_TASK), built once for the app and explorer tests."""
    spec = app_test_model()
    if spec is None:
        pytest.skip("no default model installed (modeling_csp/default_model) and CSP_APP_TEST_MODEL unset")
    return spec, build_test_circuit(spec, tmp_path_factory.mktemp("circuit") / "test_circuit.json")


def run_outside_project(code: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    """Runs `code` in a fresh interpreter where this project is not importable (as a hub user would)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(cwd / "hf_modules"), PYTHONNOUSERSITE="1")
    guard = (  # block the project's top-level packages even if it is pip-installed
        "import sys\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('modeling_csp', 'conversion'):\n"
        "            raise ImportError(f'{name} is blocked: remote code must not need the project')\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", guard + code], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return result


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(python, cwd: Path, env: dict, log_path: Path, timeout: float = 240):
    """Starts `python app.py` in `cwd` on a free local port with `env` added, waits until the page answers (failing
    with the log's tail if the server exits or stays silent), yields its URL, and stops it afterwards."""
    import time
    import urllib.request

    port = free_port()
    env = {**env, "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), "GRADIO_ANALYTICS_ENABLED": "False"}
    url = f"http://127.0.0.1:{port}/"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([str(python), "app.py"], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + timeout
            while True:
                if proc.poll() is not None:
                    log.flush()
                    pytest.fail(f"app.py exited with {proc.returncode}:\n{Path(log_path).read_text()[-3000:]}")
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        if response.status == 200:
                            break
                except OSError:
                    pass
                if time.time() > deadline:
                    pytest.fail(f"app.py did not answer within {timeout:.0f} s:\n{Path(log_path).read_text()[-3000:]}")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def tracebacks_through_project_code(log_text: str) -> list[str]:
    """The tracebacks in a server log with a frame in this project's own source. One entirely inside the web stack
    (gradio's SSE stream answering 404 when a browser page closes mid-stream) is not ours to fail on, and a venv
    inside the checkout (.ci/run's `.ci-lowest`) holds installed packages, not project code."""
    ours = []
    for block in log_text.split("Traceback (most recent call last):")[1:]:
        for frame in re.findall(r'File "([^"]+)"', block):
            path = Path(frame)
            if path.is_relative_to(PROJECT_ROOT) and "site-packages" not in path.parts:
                ours.append(block)
                break
    return ours


def dead_pid() -> int:
    """The id of a process that has ended (what a killed writer leaves in its temporary file's name)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def quote_task_lines(n=40, seed=0) -> str:
    """JSON lines of a real task in the file format a user writes (drawn from the built-in quote task)."""
    import random

    from modeling_csp.circuits.tasks import get_task

    rng, task = random.Random(seed), get_task("single_double_quote")
    examples = {}
    while len(examples) < n:
        ex = task.generate(rng)
        examples[ex.prompt] = {"prompt": ex.prompt, "correct": ex.correct, "incorrect": ex.alternative}
    return "\n".join(json.dumps(e) for e in examples.values())


def markdown_html(markdown: str) -> str:
    """The HTML a Markdown component makes of `markdown` (CommonMark with tables, raw HTML passed through as Gradio's
    Markdown passes it)."""
    from markdown_it import MarkdownIt

    return MarkdownIt("commonmark", {"html": True}).enable("table").render(markdown)


def markdown_text(markdown: str) -> str:
    """The text a Markdown component shows of `markdown` (tags dropped, entities and escapes undone)."""
    import html
    import re

    return html.unescape(re.sub(r"<[^>]*>", "", markdown_html(markdown))).strip()


def put_in_hub_cache(cache: Path, repo_id: str, folder: Path) -> Path:
    """`folder`'s files (linked) as the Hugging Face cache's snapshot of the model `repo_id`, as a download leaves
    it; returns the snapshot folder. Point `huggingface_hub.constants.HF_HUB_CACHE` at `cache` to use it."""
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / ("a" * 40)
    snapshot.mkdir(parents=True)
    for f in Path(folder).iterdir():
        if f.is_file():
            (snapshot / f.name).symlink_to(f.resolve())
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("a" * 40)
    return snapshot
