"""Loading a weight-sparse model and its tokenizer from a folder, a hub id, or `default`.

Models load through this package's own `CSPForCausalLM` (the same code a converted folder ships as remote
code), so no code from the folder or the hub is executed. Failures become one-line ValueErrors.
"""

from __future__ import annotations

import json
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parent / "default_model"


def resolve_model(spec: str) -> str:
    """`default` -> the embedded model folder; a folder stays a folder; anything else is a hub id."""
    if spec == "default":
        if not (DEFAULT_MODEL_DIR / "config.json").is_file():
            raise ValueError(
                f"the default model is not installed at {DEFAULT_MODEL_DIR}; train it with "
                "`python scripts/train_default_model.py` or pass --model FOLDER_OR_HUB_ID"
            )
        return str(DEFAULT_MODEL_DIR)
    path = Path(spec).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ValueError(f"{spec} is a path but has no config.json: not a converted model folder")
        return str(path)
    return spec


def _config_json(name: str) -> dict:
    from transformers.utils import cached_file

    try:
        file = cached_file(name, "config.json")
    except Exception as exc:  # OSError, EnvironmentError, HF hub errors
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"could not load model {name!r}: it is not a local folder and the hub lookup failed ({first}). "
            "If you are offline (HF_HUB_OFFLINE=1), download it once online so it is in the Hugging Face cache"
        ) from None
    if file is None:
        raise ValueError(f"could not load model {name!r}: no config.json")
    return json.loads(Path(file).read_text())


def load_tokenizer(name: str):
    """The folder's tokenizer.json as a fast tokenizer; never runs remote code."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if Path(name).is_dir() and (Path(name) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(name)  # skips AutoConfig (and its auto_map)
    return AutoTokenizer.from_pretrained(name, trust_remote_code=False)


def load_model_and_tokenizer(spec: str, dtype=None):
    """(model in eval mode, tokenizer) for a converted folder, a hub id, or `default`."""
    import torch

    from .modeling_csp import CSPForCausalLM

    name = resolve_model(spec)
    config = _config_json(name)
    if config.get("model_type") != "csp":
        raise ValueError(f"{spec} is not a weight-sparse CSP model (model_type={config.get('model_type')!r})")
    try:
        model = CSPForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
        tokenizer = load_tokenizer(name)
    except Exception as exc:
        raise ValueError(f"could not load model {spec!r}: {str(exc).strip().splitlines()[0]}") from None
    model.eval()
    return model, tokenizer


__all__ = ["load_model_and_tokenizer", "load_tokenizer", "resolve_model", "DEFAULT_MODEL_DIR"]
