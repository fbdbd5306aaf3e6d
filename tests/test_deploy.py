"""Deploying: `csp space build` makes a Space that boots in a fresh environment as Spaces would run it, and
`csp space push` / `csp publish` send the expected files through huggingface_hub to a local stand-in Hub."""

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from huggingface_hub import ModelCard, SpaceCard

from conftest import PROJECT_ROOT, put_in_hub_cache, serve_app
from hub_standin import VALID_TOKEN, HubStandIn
from modeling_csp.cli import main
from modeling_csp.deploy import DeployError, listed_models
from modeling_csp.model.loading import DEFAULT_MODEL_DIR


def csp(*argv, env=None, timeout=600):
    """The CLI in a subprocess, as a user runs it (huggingface_hub reads HF_ENDPOINT when it is imported)."""
    return subprocess.run([sys.executable, "-m", "modeling_csp.cli", *map(str, argv)], cwd=PROJECT_ROOT,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout)


def hub_env(hub, token=VALID_TOKEN):
    return {"HF_ENDPOINT": hub.url, "HF_TOKEN": token, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1"}


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in result.stderr, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """A Space listing the embedded model and a hub model (offline: in the hub cache, as a download leaves it)."""
    from huggingface_hub import constants

    cache = tmp_path_factory.mktemp("hub_cache")
    put_in_hub_cache(cache, "someone/csp-yolo1-converted", DEFAULT_MODEL_DIR)
    out = tmp_path_factory.mktemp("space") / "space"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(constants, "HF_HUB_CACHE", str(cache))
        assert main(["space", "build", str(out), "--models", "default,someone/csp-yolo1-converted"]) == 0
    return out


def test_space_build_writes_a_complete_space(space):
    import gradio

    card = SpaceCard.load(space / "README.md")
    assert card.data.sdk == "gradio" and card.data.sdk_version == gradio.__version__ and card.data.app_file == "app.py"
    assert card.data.python_version and card.data.models == ["csp-circuits/csp-stdlib-default", "someone/csp-yolo1-converted"]
    requirements = (space / "requirements.txt").read_text().splitlines()
    pins = dict(line.split("==") for line in requirements if "==" in line)
    assert pins["torch"] == "2.13.0" and pins["gradio"] == gradio.__version__ and "transformers" in pins
    assert all("==" in line or line.startswith("--extra-index-url") for line in requirements)
    assert "*.safetensors filter=lfs" in (space / ".gitattributes").read_text()
    assert (space / "app.py").is_file() and (space / "modeling_csp" / "default_model" / "model.safetensors").is_file()
    assert json.loads((space / "csp_space.json").read_text())["models"] == ["default", "someone/csp-yolo1-converted"]
    assert not list(space.rglob("__pycache__"))


def test_a_spaces_requirements_are_the_core_and_the_app_extras(space):
    """A Space runs the app: its requirements.txt pins pyproject's dependencies and the [app] extra's, no test tools."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from packaging.requirements import Requirement

    project = tomllib.loads((PROJECT_ROOT / "pyproject.toml").read_text())["project"]
    wanted = {Requirement(r).name.lower() for r in project["dependencies"] + project["optional-dependencies"]["app"]}
    pinned = {line.split("==")[0].lower() for line in (space / "requirements.txt").read_text().splitlines() if "==" in line}
    assert {"gradio", "plotly"} <= wanted and wanted <= pinned, wanted - pinned
    assert not pinned & {"pytest", "playwright", "hypothesis", "import-linter", "csp-circuits"}, pinned


def test_the_app_lists_the_built_models_unless_csp_models_says_otherwise(space, tmp_path):
    assert listed_models(space) == ["default", "someone/csp-yolo1-converted"]
    assert listed_models(space, env=" org/a , default,org/a ") == ["org/a", "default"]
    assert listed_models(tmp_path) == ["default"]  # a checkout: no csp_space.json
    (tmp_path / "csp_space.json").write_text('{"models": ["default", "../../etc"]}')
    with pytest.raises(DeployError, match="csp_space.json: '../../etc' is not a hub repository id"):
        listed_models(tmp_path)
    (tmp_path / "csp_space.json").write_text("{not json")
    with pytest.raises(DeployError, match="rebuild the Space or set CSP_MODELS"):
        listed_models(tmp_path)
    with pytest.raises(DeployError, match="CSP_MODELS: 'a b' is not a hub repository id"):
        listed_models(tmp_path, env="a b")


def test_space_build_refusals_are_one_line(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert_one_line_error(csp("space", "build", tmp_path / "full"), "not an empty folder")
    assert_one_line_error(csp("space", "build", tmp_path / "new", "--models", "default,not a repo"), "not a hub repository id")
    offline = {"HF_HUB_OFFLINE": "1"}
    unknown = csp("space", "build", tmp_path / "new", "--models", "default,nope/nope", env=offline)
    assert_one_line_error(unknown, "'nope/nope'", "hub lookup failed")
    assert not (tmp_path / "new").exists()


def test_publish_sends_the_model_folder_with_its_card_filled_in(tmp_path):
    with HubStandIn() as hub:
        result = csp("publish", DEFAULT_MODEL_DIR, "someone/csp-stdlib-default", env=hub_env(hub))
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout)["model"] == "someone/csp-stdlib-default"
        assert ("model", "someone/csp-stdlib-default") in hub.repos
        files = hub.files[("model", "someone/csp-stdlib-default")]
    for name in ("config.json", "model.safetensors", "modeling_csp.py", "configuration_csp.py", "tokenizer.json",
                 "generation_config.json", "circuits/index.json"):
        assert files[name] == (DEFAULT_MODEL_DIR / name).read_bytes(), name
    card = ModelCard(files["README.md"].decode())
    assert card.data.library_name == "transformers" and "PATH_OR_REPO" not in card.text
    assert 'from_pretrained("someone/csp-stdlib-default", trust_remote_code=True)' in card.text
    assert "PATH_OR_REPO" in (DEFAULT_MODEL_DIR / "README.md").read_text()  # the local folder is left as it was


def test_space_push_sends_the_space(space):
    with HubStandIn() as hub:
        result = csp("space", "push", space, "someone/circuits", env=hub_env(hub))
        assert result.returncode == 0, result.stderr
        assert hub.repos[("space", "someone/circuits")]["sdk"] == "gradio"
        files = hub.files[("space", "someone/circuits")]
    assert {"README.md", "app.py", "requirements.txt", ".gitattributes", "csp_space.json",
            "modeling_csp/default_model/model.safetensors", "modeling_csp/model/modeling_csp.py"} <= set(files)


def test_offline_and_unauthorised_are_one_line_errors(space):
    with HubStandIn() as hub:
        assert_one_line_error(csp("publish", DEFAULT_MODEL_DIR, "someone/m", env={**hub_env(hub), "HF_HUB_OFFLINE": "1"}),
                              "could not upload", "someone/m")
        assert_one_line_error(csp("space", "push", space, "someone/s", env=hub_env(hub, token="hf_wrong")),
                              "could not upload", "401")
        assert not hub.files
    assert_one_line_error(csp("publish", PROJECT_ROOT / "tests", "someone/m"), "not a converted model folder")


def test_the_built_space_boots_in_a_fresh_environment(space, tmp_path):
    """What Spaces does: a new environment with only the folder's requirements.txt (CPU torch first, as the README
    says), then `python app.py`; the page loads and /next_tokens answers."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    # The CPU torch index the requirements name is out of reach here: fail it fast instead of retrying.
    pip_env = {**os.environ, "PIP_RETRIES": "0", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    for args in (["torch==2.13.0"], ["-r", str(space / "requirements.txt")]):
        result = subprocess.run([str(python), "-m", "pip", "install", "-q", *args], env=pip_env, capture_output=True,
                                text=True, timeout=1500)
        assert result.returncode == 0, result.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", PYTHONNOUSERSITE="1")
    with serve_app(python, space, env, tmp_path / "space.log", timeout=300) as url:
        with urllib.request.urlopen(url + "config", timeout=30) as response:
            components = json.load(response)["components"]
        box = next(c for c in components if c.get("props", {}).get("elem_id") == "model-select")
        assert [c[1] for c in box["props"]["choices"]] == ["default", "someone/csp-yolo1-converted"]  # csp_space.json
        from gradio_client import Client

        out = Client(url, verbose=False).predict(prompt="x = 'hello", api_name="/next_tokens")
        assert out.get("full") and out["full"][0]["token"], out
        imported = subprocess.run([str(python), "-c", "import modeling_csp, sys; print(modeling_csp.__file__)"], cwd=space,
                                  env=env, capture_output=True, text=True)
        assert Path(imported.stdout.strip()).parent == space / "modeling_csp"  # the Space's own copy, not this checkout
