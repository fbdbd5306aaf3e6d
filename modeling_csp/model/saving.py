"""Writes a model folder: what `from_pretrained(folder, trust_remote_code=True)` and the Hub need.

Conversion (`conversion/`) and training (`modeling_csp.training`) both end here, so a converted and a trained
folder have the same layout: config with auto_map, the remote-code files, sparse safetensors, generation config,
tokenizer and model card.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

from transformers import GenerationConfig

from ..utils.jsonio import copy_file_atomic, new_file_mode, write_json_atomic, write_text_atomic
from ..utils.tempfiles import remove_orphan_temps
from .modeling_csp import CSPForCausalLM
from .tokenization import ENDOFTEXT

CARD_TEMPLATE = Path(__file__).resolve().parent / "model_card.md"
WEIGHT_FILE = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?|pytorch_model.*\.bin(\.index\.json)?")


class ModelFolderError(ValueError):
    """A problem with a model folder to write or its inputs, as one line naming the file."""


def weight_density(model: CSPForCausalLM) -> float:
    """Fraction of nonzero entries over all weight matrices (what the paper's L0 budget counts); the bigram
    logit table has its own budget and is left out."""
    matrices = [p for n, p in model.named_parameters() if p.ndim == 2 and n != "bigram_table"]
    return sum(int(p.count_nonzero()) for p in matrices) / sum(p.numel() for p in matrices)


def render_model_card(model: CSPForCausalLM, name: str, source: str, extra: str = "") -> str:
    c = model.config
    n_params = sum(p.numel() for p in model.parameters())
    return CARD_TEMPLATE.read_text().format(
        name=name, source=source, n_layer=c.n_layer, d_model=c.d_model, n_head=c.n_head, d_head=c.d_head,
        d_mlp=c.d_mlp, block_size=c.block_size, vocab_size=c.vocab_size, norm="RMSNorm" if c.rms_norm else "LayerNorm",
        afrac=c.afrac, sink=c.sink, bigram=c.enable_bigram_table, n_params=f"{n_params / 1e6:.2f}M",
        density=f"{100 * weight_density(model):.2f}%" + (
            f" (bigram table {100 * model.bigram_table.count_nonzero().item() / model.bigram_table.numel():.2f}%)"
            if model.bigram_table is not None else ""
        ), extra=extra,
    )


def save_model_folder(
    model: CSPForCausalLM,
    dst: str | os.PathLike,
    tokenizer_json_dir: str | os.PathLike | None = None,
    name: str | None = None,
    source: str = "",
    card_extra: str = "",
) -> Path:
    """Writes a self-contained folder: config with auto_map, modeling files, sparse safetensors,
    generation config, tokenizer (copied from a folder with tokenizer.json) and card.

    Weights keep their dtype on disk (bf16 stays exactly bf16) while config.json asks for float32,
    the reference's compute dtype.
    """
    dst = prepare_output_folder(dst)
    remove_orphan_temps(dst)  # what writes killed in this folder before left
    CSPForCausalLM.register_for_auto_class("AutoModelForCausalLM")
    model.config.register_for_auto_class()
    eot = None
    if tokenizer_json_dir is not None:
        check_tokenizer_size(json.loads((Path(tokenizer_json_dir) / "tokenizer.json").read_text()), model.config.vocab_size,
                             Path(tokenizer_json_dir) / "tokenizer.json")
        for file in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (Path(tokenizer_json_dir) / file).exists():
                copy_file_atomic(Path(tokenizer_json_dir) / file, dst / file)
    if (dst / "tokenizer.json").exists():
        added = json.loads((dst / "tokenizer.json").read_text())["added_tokens"]
        eot = next((t["id"] for t in added if t["content"] == ENDOFTEXT), None)
    model.generation_config = GenerationConfig(eos_token_id=eot, pad_token_id=eot, bos_token_id=None)
    with tempfile.TemporaryDirectory(dir=dst, prefix=f".save.tmp{os.getpid()}-") as staging:
        # transformers writes its files in place (safetensors at mode 0600): each is moved in whole instead
        staged = Path(staging)
        model.save_pretrained(staged)
        config = json.loads((staged / "config.json").read_text())
        config["dtype"] = "float32"
        write_json_atomic(staged / "config.json", config, indent=2, sort_keys=True)
        written = {f.name for f in staged.iterdir() if f.is_file()}
        for file in sorted(written, key=lambda n: n == "config.json"):  # config.json last: it says what loads
            os.chmod(staged / file, new_file_mode())
            os.replace(staged / file, dst / file)
    for stale in dst.iterdir():  # weights of an earlier save that this one does not replace
        if WEIGHT_FILE.fullmatch(stale.name) and stale.name not in written:
            stale.unlink()
    write_text_atomic(dst / "README.md", render_model_card(model, name or dst.name, source, card_extra))
    remove_orphan_temps(dst)
    return dst


def check_tokenizer_size(tokenizer_json: dict, vocab_size: int, source) -> None:
    """Refuses a tokenizer with ids the model has no embedding for (every such text would fail in `wte`)."""
    ids = [*tokenizer_json["model"]["vocab"].values(), *(t["id"] for t in tokenizer_json.get("added_tokens", []))]
    if ids and max(ids) >= vocab_size:
        raise ModelFolderError(f"{source}: the tokenizer has ids up to {max(ids)} but the model's vocab_size is {vocab_size}; "
                              "pass the model's own tokenizer")


def prepare_output_folder(dst: str | os.PathLike) -> Path:
    """Creates DST (a folder) or refuses in one line: a file in the way, or no permission to write."""
    dst = Path(dst)
    if dst.exists() and not dst.is_dir():
        raise ModelFolderError(f"{dst}: exists and is not a folder; choose a new output folder")
    try:
        dst.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelFolderError(f"{dst}: cannot create the output folder ({e.strerror or e})") from None
    if not os.access(dst, os.W_OK | os.X_OK):
        raise ModelFolderError(f"{dst}: the output folder is not writable")
    return dst
