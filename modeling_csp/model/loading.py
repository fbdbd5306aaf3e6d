"""Loading a weight-sparse model and its tokenizer from a folder, a hub id, or `default`, and the circuits
a model folder ships (`circuits/index.json`).

Models load through this package's own `CSPForCausalLM` (the same code a converted folder ships as remote
code), so no code from the folder or the hub is executed. Failures become one-line ValueErrors.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

DEFAULT_MODEL_DIR = Path(__file__).resolve().parents[1] / "default_model"


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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _hub_failed(name: str, exc: BaseException, local_too: bool) -> ValueError:
    where = "it is not a local folder and the hub lookup failed" if local_too else "the Hugging Face hub lookup failed"
    return ValueError(f"could not load model {name!r}: {where} ({_first_line(exc)}). If you are offline "
                      "(HF_HUB_OFFLINE=1), download it once online so it is in the Hugging Face cache")


def config_from_file(file: str | Path) -> dict:
    """A config.json as a dict, or ValueError naming the file (empty, not JSON, not an object)."""
    file = Path(file)
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ValueError(f"{file}: cannot be read ({exc.strerror or exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
        reason = "is empty" if not file.stat().st_size else f"is not valid JSON ({_first_line(exc)})"
        raise ValueError(f"{file}: {reason}; convert the model again or fix the file") from None
    if not isinstance(config, dict):
        raise ValueError(f"{file}: is not a JSON object of model settings; convert the model again or fix the file")
    return config


def read_config_json(name: str) -> dict:
    """A model's config.json (folder or hub name) as a dict, without building the model or running its code."""
    from transformers.utils import cached_file

    try:
        file = cached_file(name, "config.json")
    except Exception as exc:  # OSError, EnvironmentError, HF hub errors
        raise _hub_failed(name, exc, local_too=True) from None
    if file is None:
        raise ValueError(f"could not load model {name!r}: no config.json")
    return config_from_file(file)


def hub_folder(repo_id: str, config_only: bool = False) -> str:
    """The local snapshot of a hub model (from the Hugging Face cache, else the Hub), as a folder. A hub id is only
    ever looked up on the hub, never taken for a local folder of the same relative name."""
    from huggingface_hub import hf_hub_download, snapshot_download

    try:
        if config_only:
            return str(Path(hf_hub_download(repo_id, "config.json")).parent)
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "circuits/*"])
    except Exception as exc:  # offline, not found, unauthorised, invalid id: many types, one line
        raise _hub_failed(repo_id, exc, local_too=False) from None


def read_hub_config(repo_id: str) -> dict:
    """A hub model's config.json as a dict (hub cache or Hub only, see `hub_folder`)."""
    return config_from_file(Path(hub_folder(repo_id, config_only=True)) / "config.json")


def load_tokenizer(name: str):
    """The folder's tokenizer.json as a fast tokenizer; never runs remote code."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if Path(name).is_dir() and (Path(name) / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(name)  # skips AutoConfig (and its auto_map)
    return AutoTokenizer.from_pretrained(name, trust_remote_code=False)


def load_model_and_tokenizer(spec: str, dtype=None):
    """(model in eval mode, tokenizer) for a converted folder, a hub id, or `default`."""
    import torch

    from .configuration_csp import CSPConfig
    from .modeling_csp import CSPForCausalLM

    name = resolve_model(spec)
    config = read_config_json(name)
    if config.get("model_type") != "csp":
        raise ValueError(f"{spec} is not a weight-sparse CSP model (model_type={config.get('model_type')!r})")
    try:  # sizes against their limits and the free memory, before anything is allocated
        CSPConfig.from_dict(config).check_fits_in_memory(what=f"model {spec!r}")
    except (ValueError, TypeError) as exc:
        raise ValueError(f"could not load model {spec!r}: {str(exc).strip().splitlines()[0]}") from None
    try:
        model = CSPForCausalLM.from_pretrained(name, dtype=dtype or torch.float32)
        tokenizer = load_tokenizer(name)
    except Exception as exc:
        raise ValueError(f"could not load model {spec!r}: {str(exc).strip().splitlines()[0]}") from None
    model.eval()
    return model, tokenizer


MAX_INDEX_BYTES = 1_000_000  # a circuits/index.json larger than this is refused (it is read whole)


def _inside(folder: Path, relative) -> Path | None:
    """folder/relative when `relative` is a relative path that stays inside `folder` (judged on the names, not by
    following links: hub snapshots are links into the cache's blob store), else None."""
    if not isinstance(relative, str) or not relative or "\x00" in relative:
        return None
    rel = Path(relative)
    if rel.is_absolute() or rel.drive or ".." in rel.parts or relative.startswith("~"):
        return None
    return folder / rel


def shipped_circuits(model_spec: str) -> list[dict]:
    """[{task, k, path, at_target}] for the circuits in a model's `circuits/` folder (index.json, else every
    *.json); `at_target` marks the circuit found for the target loss (None when the index does not say).

    An index entry whose path leaves the circuits folder (absolute, `..`) or is not a .json file there is
    skipped: the index comes with the model, and the model may come from anyone."""
    name = resolve_model(model_spec)
    folder = Path(os.path.abspath(name)) / "circuits"
    if not Path(name).is_dir():
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(name, allow_patterns=["circuits/*"])) / "circuits"
        except Exception as exc:
            raise ValueError(f"could not list circuits of {name!r} on the hub: {str(exc).strip().splitlines()[0]}") from None
    if not folder.is_dir():
        return []
    index = folder / "index.json"
    if index.is_file():
        if index.stat().st_size > MAX_INDEX_BYTES:
            raise ValueError(f"{index} is larger than {MAX_INDEX_BYTES:,} bytes")
        try:
            entries = json.loads(index.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{index} is not valid JSON ({exc})") from None
        entries = entries.get("circuits", []) if isinstance(entries, dict) else entries
        if not isinstance(entries, list) or not all(isinstance(e, dict) and "path" in e for e in entries):
            raise ValueError(f"{index} must be a list of {{task, k, path}} objects")
        out = []
        for e in entries:
            path = _inside(folder, e["path"])
            if path is None or path.suffix.lower() != ".json" or not path.is_file():
                continue  # never named in messages: the path is the model author's, not ours to echo
            out.append({"task": e.get("task"), "k": e.get("k"), "path": str(path), "at_target": e.get("at_target")})
        return out
    out = []
    for file in sorted(folder.glob("*.json")):
        try:
            data = json.loads(file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if isinstance(data, dict) and data.get("format") == "csp-circuit":
            out.append({"task": data.get("task"), "k": data.get("k"), "path": str(file), "at_target": None})
    return out


__all__ = ["load_model_and_tokenizer", "load_tokenizer", "resolve_model", "shipped_circuits", "DEFAULT_MODEL_DIR",
           "read_config_json", "read_hub_config", "hub_folder", "config_from_file"]
