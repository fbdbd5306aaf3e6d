"""Converts an original `circuit_sparsity` checkpoint into a self-contained transformers folder.

    python -m conversion.convert_checkpoint SRC DST [--tokenizer-dir DIR] [--push-to-hub REPO]

SRC is a local folder with `beeg_config.json` + `final_model.pt`, or the name of a released
model (csp_yolo1, csp_yolo2, csp_sweep1_*, csp_bridge1, dense1_1x, ...), downloaded from
OpenAI's public release into the Hugging Face cache. The output loads with
`AutoModelForCausalLM.from_pretrained(DST, trust_remote_code=True)`.
"""

import argparse
import json
import os
import re
import sys
import urllib.request
from pathlib import Path

import torch
from huggingface_hub import constants as hub_constants
from tqdm.auto import tqdm

from modeling_csp.model.configuration_csp import CSPConfig
from modeling_csp.model.modeling_csp import CSPForCausalLM, expected_shapes, few_names
from modeling_csp.model.saving import ModelFolderError, prepare_output_folder, save_model_folder
from modeling_csp.utils.jsonio import atomic_open, dumps_strict


RELEASE_URL = "https://openaipublic.blob.core.windows.net/circuit-sparsity"
RELEASE_TOKENIZER = "tinypython"  # {RELEASE_URL}/tinypython/{encoder.json,vocab.bpe}
RELEASED_NAME = re.compile(r"^(csp|dense)\d*_[\w.-]+$")


class ConversionError(ValueError):
    """A problem with the input files, reported as one line naming the file."""


# ---- reading the original format ------------------------------------------------------


def release_cache_dir() -> Path:
    return Path(hub_constants.HF_HOME) / "circuit_sparsity"


def download_release_file(relative_path: str) -> Path:
    """Downloads `{RELEASE_URL}/{relative_path}` into the cache once, with a progress bar."""
    target = release_cache_dir() / relative_path
    if target.exists():
        return target
    if hub_constants.HF_HUB_OFFLINE:
        raise ConversionError(
            f"{relative_path} is not in the cache ({target}) and HF_HUB_OFFLINE is set; "
            "download it once online or pass a local folder"
        )
    url = f"{RELEASE_URL}/{relative_path}"
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_open(target) as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=relative_path) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        raise ConversionError(f"could not download {url}: {e}") from e
    return target


def resolve_source(src: str) -> Path:
    """A local folder as it is; a released model name downloaded into the cache."""
    path = Path(src)
    if path.is_dir():
        return path
    if RELEASED_NAME.match(src):
        for name in ("beeg_config.json", "final_model.pt"):
            download_release_file(f"models/{src}/{name}")
        return release_cache_dir() / "models" / src
    raise ConversionError(
        f"{src}: not a folder and not a released model name (e.g. csp_yolo1, csp_sweep1_..., dense1_1x)"
    )


def resolve_release_tokenizer() -> Path:
    for name in ("encoder.json", "vocab.bpe"):
        download_release_file(f"{RELEASE_TOKENIZER}/{name}")
    return release_cache_dir() / RELEASE_TOKENIZER


def read_original_config(path: Path) -> CSPConfig:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found (SRC must hold beeg_config.json and final_model.pt)")
    try:
        original = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(original, dict):
        raise ConversionError(f"{path}: expected a JSON object of GPTConfig fields")
    if original.pop("use_tied_aux_matrix", False):
        raise ConversionError(f"{path}: use_tied_aux_matrix=true is not supported (the reference refuses it too)")
    try:
        return CSPConfig.from_original_config(original)
    except (ValueError, TypeError) as e:
        raise ConversionError(f"{path}: {e}") from e


def read_original_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConversionError(f"{path}: file not found (SRC must hold beeg_config.json and final_model.pt)")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for corrupt or unsafe files
        raise ConversionError(f"{path}: cannot be read as a weights-only state dict ({type(e).__name__}: {e})") from e
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ConversionError(f"{path}: expected a dict of tensors (a model state dict)")
    return state_dict


def check_state_dict(config: CSPConfig, state_dict: dict[str, torch.Tensor], source: Path) -> dict[str, torch.Tensor]:
    """Accounts for every tensor: returns exactly the model's tensors, or raises naming the problem.

    Shapes come from the config alone (`expected_shapes`), so a config that does not match the checkpoint is
    refused before any model is built, and so is a model that would not fit in memory.
    """
    state_dict = dict(state_dict)
    for key in [k for k in state_dict if re.fullmatch(r"transformer\.h\.\d+\.attn\.bias", k)]:
        del state_dict[key]  # causal-mask buffer of models saved with flash=False; recomputed on the fly
    state_dict.setdefault("final_logits_bias", torch.zeros(config.vocab_size))  # as the reference loader
    if _n_layers(state_dict) != config.n_layer:  # before anything is sized from the config
        raise ConversionError(f"{source}: the config says n_layer={config.n_layer} but the checkpoint has "
                              f"{_n_layers(state_dict)} layers")
    expected = expected_shapes(config)
    if config.tied_unembed and "lm_head.weight" in state_dict and "transformer.wte.weight" in state_dict:
        if not torch.equal(state_dict["lm_head.weight"], state_dict["transformer.wte.weight"]):
            raise ConversionError(f"{source}: tied_unembed is set but lm_head.weight differs from transformer.wte.weight")
        del state_dict["lm_head.weight"]
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing:
        raise ConversionError(f"{source}: missing tensor(s) {few_names(missing)} for this config")
    if unexpected:
        raise ConversionError(f"{source}: unexpected tensor(s) {few_names(unexpected)} not used by this config")
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != expected[key]:
            raise ConversionError(f"{source}: {key} has shape {tuple(tensor.shape)}, the config expects {expected[key]}")
        if not tensor.is_floating_point():
            raise ConversionError(f"{source}: {key} has dtype {tensor.dtype}, expected a floating-point tensor")
        if not torch.isfinite(tensor).all():
            raise ConversionError(f"{source}: {key} contains NaN or infinite values")
    return state_dict


def _n_layers(state_dict) -> int:
    return len({m.group(1) for k in state_dict if (m := re.match(r"transformer\.h\.(\d+)\.", k))})


def load_original(src: Path) -> CSPForCausalLM:
    """The original checkpoint as a CSPForCausalLM, in the checkpoint's own dtype (bf16 stays bf16)."""
    config = read_original_config(src / "beeg_config.json")
    check_memory(config, src / "beeg_config.json")
    state_dict = check_state_dict(config, read_original_state_dict(src / "final_model.pt"), src / "final_model.pt")
    dtype = state_dict["transformer.wte.weight"].dtype
    with torch.device("meta"):  # the checkpoint's tensors become the parameters: nothing is allocated twice
        model = CSPForCausalLM(config)
    model.load_state_dict({k: v.to(dtype) for k, v in state_dict.items()}, strict=False, assign=True)
    if config.tied_unembed:
        model.tie_weights()
    return model.eval()


def check_memory(config: CSPConfig, source: Path) -> None:
    """Refuses, before the checkpoint is read, a model whose float32 weights would not fit in the memory available."""
    try:
        config.check_fits_in_memory(what=f"{source}: the model")
    except ValueError as e:
        raise ConversionError(str(e)) from None


def folder_ready(dst: str | os.PathLike) -> Path:
    try:
        return prepare_output_folder(dst)
    except ModelFolderError as e:
        raise ConversionError(str(e)) from None


def save_converted_folder(model: CSPForCausalLM, dst: str | os.PathLike, tokenizer_dir: str | os.PathLike | None = None,
                          name: str | None = None, source: str = "") -> Path:
    """`save_model_folder`, with the tokenizer converted from the data-gym files in `tokenizer_dir` first."""
    dst = folder_ready(dst)
    try:
        if tokenizer_dir is not None:
            from conversion.convert_tokenizer import convert_tokenizer

            convert_tokenizer(tokenizer_dir, dst, model_max_length=model.config.block_size, vocab_size=model.config.vocab_size)
        return save_model_folder(model, dst, name=name, source=source)
    except ValueError as e:
        raise ConversionError(str(e)) from None


def convert_checkpoint(
    src: str, dst: str | os.PathLike, tokenizer_dir: str | None = None, push_to_hub: str | None = None
) -> Path:
    source = resolve_source(src)
    folder_ready(dst)  # before the slow part
    model = load_original(source)
    if tokenizer_dir is None and RELEASED_NAME.match(src) and not Path(src).is_dir():
        tokenizer_dir = resolve_release_tokenizer()
    out = save_converted_folder(model, dst, tokenizer_dir=tokenizer_dir, name=Path(src).name, source=src)
    if push_to_hub:
        from modeling_csp.deploy import DeployError, publish_model

        try:
            publish_model(out, push_to_hub)
        except DeployError as e:
            raise ConversionError(f"converted into {out}, but {e}") from None
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("src", help="folder with beeg_config.json + final_model.pt, or a released model name")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--tokenizer-dir", help="folder with the tiktoken data-gym files encoder.json + vocab.bpe")
    parser.add_argument("--push-to-hub", metavar="REPO", help="upload the converted folder to this hub repo")
    args = parser.parse_args(argv)
    try:
        out = convert_checkpoint(args.src, args.dst, args.tokenizer_dir, args.push_to_hub)
    except (ConversionError, OSError, ValueError) as e:
        print(f"error: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(dumps_strict({"output": str(out), "safetensors_bytes": size}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
