"""Publishing to the Hugging Face Hub: model folders as model repos, and the app as a Space.

`build_space` assembles a complete Space folder (card with front matter, pinned requirements, the app, this
package with the embedded model, `.gitattributes`); `push_space` and `publish_model` upload through
`huggingface_hub` (`create_repo` + `upload_folder`), with the token from the usual places (`HF_TOKEN`,
`hf auth login`). Every failure is a `DeployError` with a one-line message (offline, unauthorised, a folder
that is not what it should be).
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from importlib.metadata import PackageNotFoundError, requires, version
from pathlib import Path

from .utils.jsonio import copy_file_atomic, write_json_atomic, write_text_atomic
from .model.loading import DEFAULT_MODEL_DIR

PACKAGE_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = PACKAGE_DIR.parent
SPACE_CARD = PROJECT_ROOT / "hub_cards" / "space_card.md"
DEFAULT_MODEL_REPO = "csp-circuits/csp-stdlib-default"  # what `csp publish modeling_csp/default_model ...` creates
SPACE_MODELS_FILE = "csp_space.json"  # the models named at build time; the app reads it ($CSP_MODELS overrides)
PYTHON_VERSION = "3.11"
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
# Binary files go through git-lfs/xet on the Hub.
GITATTRIBUTES = "".join(f"*.{ext} filter=lfs diff=lfs merge=lfs -text\n" for ext in
                        ("safetensors", "bin", "pt", "pth", "ckpt", "npz", "npy", "gz", "zip", "png", "jpg"))
# The Space's app.py: the app itself is this package's (`modeling_csp.app.ui.main`), shipped in the Space.
SPACE_APP = '''"""The circuit explorer (Gradio), as built by `csp space build`."""

from pathlib import Path

from modeling_csp.app.ui import main

if __name__ == "__main__":
    main(Path(__file__).resolve().parent)
'''
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[\w.-]{1,96}$")


class DeployError(Exception):
    """A deployment problem, said in one line."""


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def check_repo_id(repo_id: str) -> str:
    if not HUB_ID.match(repo_id or ""):
        raise DeployError(f"{repo_id!r} is not a hub repository id; expected OWNER/NAME")
    return repo_id


def check_model_specs(models: list[str]) -> list[str]:
    """The models an app lists: 'default' or hub ids, each once, in order."""
    for spec in models:
        if spec != "default":
            check_repo_id(spec)
    return list(dict.fromkeys(models))


# ---- the Space folder ----------------------------------------------------------------------------


def pinned_requirements() -> list[str]:
    """This package's runtime requirements and its [app] extra's (a Space runs the app), pinned to the installed
    versions: the ones CI has just tested."""
    from packaging.requirements import Requirement

    lines = [f"--extra-index-url {TORCH_CPU_INDEX}"]  # the CPU wheel of torch on CPU Spaces, not several GB of CUDA
    for line in requires("csp-circuits") or []:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": "app"}):
            continue
        name = requirement.name
        try:
            installed = version(name)
        except PackageNotFoundError:
            raise DeployError(f"{name} is not installed; a Space needs the app extra: "
                              "pip install 'csp-circuits[app]'") from None
        lines.append(f"{name}=={installed.split('+')[0]}")
    return lines


def space_card(models: list[str], title: str | None = None) -> str:
    """The Space's README.md: the card in hub_cards/ with front matter naming the models and the tested gradio."""
    from huggingface_hub import SpaceCard

    card = SpaceCard(SPACE_CARD.read_text(encoding="utf-8"))
    card.data.sdk = "gradio"
    card.data.sdk_version = version("gradio")
    card.data.app_file = "app.py"
    card.data.python_version = PYTHON_VERSION
    card.data.models = models
    if title:
        card.data.title = title
    return str(card)


def check_hub_models(models: list[str]) -> None:
    """Each hub id of `models` names a weight-sparse model that the hub (or, offline, the hub cache) has: a Space
    that lists an unknown id would fail only when a visitor picks it."""
    from .model.loading import read_hub_config

    for spec in models:
        if spec == "default":
            continue
        try:
            config = read_hub_config(spec)
        except ValueError as exc:
            raise DeployError(f"--models: {exc}") from None
        if config.get("model_type") != "csp":
            raise DeployError(f"--models: {spec} is not a weight-sparse CSP model (model_type="
                              f"{config.get('model_type')!r}); list only converted models")


def hub_models(models: list[str], default_repo: str = DEFAULT_MODEL_REPO) -> list[str]:
    """The hub ids a Space serves, for its card's `models:` (the embedded model as the repo it is published to)."""
    ids = []
    for spec in models:
        repo = default_repo if spec == "default" else spec
        ids.append(check_repo_id(repo))
    return list(dict.fromkeys(ids))


def build_space(out: str | Path, models: list[str] | None = None, default_repo: str = DEFAULT_MODEL_REPO,
                title: str | None = None) -> Path:
    """Writes a complete Space folder into `out` (created; must be empty if it exists).

    `models` are what the app lists: `default` (the embedded model, shipped inside the Space) and hub ids of
    converted models, loaded from the Hub when picked; each must be on the Hub (offline: in the hub cache)."""
    models = check_model_specs(models or ["default"])
    check_hub_models(models)
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DeployError(f"{out}: exists and is not an empty folder; choose a new output folder")
    if not (DEFAULT_MODEL_DIR / "config.json").is_file():
        raise DeployError(f"the embedded model is missing ({DEFAULT_MODEL_DIR}); train it or check out the full project")
    if not SPACE_CARD.is_file():
        raise DeployError(f"{PROJECT_ROOT} has no hub_cards/space_card.md: build from a project checkout "
                          "(pip install -e .)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "app.py", SPACE_APP)
        shutil.copytree(PACKAGE_DIR, out / "modeling_csp", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
                        copy_function=copy_file_atomic)
        write_text_atomic(out / "requirements.txt", "\n".join(pinned_requirements()) + "\n")
        write_text_atomic(out / "README.md", space_card(hub_models(models, default_repo), title))
        write_text_atomic(out / ".gitattributes", GITATTRIBUTES)
        write_json_atomic(out / SPACE_MODELS_FILE, {"models": models}, indent=2)
    except OSError as exc:
        raise DeployError(f"{out}: cannot write the Space folder ({exc.strerror or exc})") from None
    return out


def listed_models(app_dir: str | Path, env: str | None = None) -> list[str]:
    """The models a Space's app lists: `env` (CSP_MODELS, comma-separated) when set, else the build's
    csp_space.json beside the app, else just the embedded model. A malformed file is an error, not a guess."""
    if env and env.strip():
        models = [m.strip() for m in env.split(",") if m.strip()]
        source = "CSP_MODELS"
    else:
        path = Path(app_dir) / SPACE_MODELS_FILE
        if not path.is_file():
            return ["default"]
        try:
            models = json.loads(path.read_text(encoding="utf-8"))["models"]
        except (ValueError, KeyError, TypeError) as exc:
            raise DeployError(f"{path}: not a {{\"models\": [...]}} file ({exc}); rebuild the Space or set CSP_MODELS") from None
        source = str(path)
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise DeployError(f"{source}: expected a non-empty list of model names ('default' or hub ids)")
    try:
        return check_model_specs(models)
    except DeployError as exc:
        raise DeployError(f"{source}: {exc}") from None


# ---- uploading -------------------------------------------------------------------------------------


def _upload(folder: Path, repo_id: str, repo_type: str, message: str, token: str | None, **create_kwargs) -> str:
    from huggingface_hub import HfApi

    try:
        api = HfApi(token=token)
        api.create_repo(repo_id, repo_type=repo_type, exist_ok=True, **create_kwargs)
        info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type, commit_message=message)
    except Exception as exc:  # offline, unauthorised, network, hub-side errors: many types, one line
        raise DeployError(f"could not upload {folder} to the {repo_type} {repo_id}: {_first_line(exc)}") from None
    return str(getattr(info, "commit_url", info))


def push_space(folder: str | Path, repo_id: str, token: str | None = None, hardware: str | None = None) -> str:
    """Uploads a folder made by `build_space` to the Space `repo_id` (created if missing); returns the commit URL."""
    folder = Path(folder)
    check_repo_id(repo_id)
    for required in ("app.py", "README.md", "requirements.txt", "modeling_csp"):
        if not (folder / required).exists():
            raise DeployError(f"{folder}: no {required}; build it with `csp space build {folder}` first")
    extra = {"space_sdk": "gradio"}
    if hardware:
        extra["space_hardware"] = hardware
    return _upload(folder, repo_id, "space", "Deploy the circuit browser", token, **extra)


def model_card_for(folder: Path, repo_id: str) -> str:
    """The folder's card with its usage pointing at `repo_id`; its metadata must parse as a model card."""
    from huggingface_hub import ModelCard

    path = folder / "README.md"
    text = path.read_text(encoding="utf-8") if path.is_file() else ""
    card = ModelCard(text.replace("PATH_OR_REPO", repo_id))
    if card.data.library_name != "transformers":
        raise DeployError(f"{path}: the model card has no `library_name: transformers` front matter; "
                          "convert the model with python -m conversion.convert_checkpoint first")
    return str(card)


def publish_model(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Uploads a converted model folder (config, remote code, sparse weights, tokenizer, card) to `repo_id`."""
    folder = Path(folder)
    check_repo_id(repo_id)
    for required in ("config.json", "model.safetensors", "modeling_csp.py", "configuration_csp.py"):
        if not (folder / required).is_file():
            raise DeployError(f"{folder}: no {required}; not a converted model folder")
    card = model_card_for(folder, repo_id)
    with tempfile.TemporaryDirectory() as tmp:  # the card with the repo id filled in, without touching the folder
        staged = Path(tmp) / folder.name
        shutil.copytree(folder, staged, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        (staged / "README.md").write_text(card, encoding="utf-8")
        (staged / ".gitattributes").write_text(GITATTRIBUTES, encoding="utf-8")
        return _upload(staged, repo_id, "model", f"Publish {folder.name}", token, private=private)


__all__ = ["DeployError", "build_space", "push_space", "publish_model", "pinned_requirements", "space_card",
           "DEFAULT_MODEL_REPO", "SPACE_MODELS_FILE", "listed_models", "check_model_specs", "check_hub_models"]
