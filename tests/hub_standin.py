"""A local stand-in for the Hugging Face Hub's API, enough for `create_repo` + `upload_folder`, recording uploads.

Point `HF_ENDPOINT` at `HubStandIn.url` (before huggingface_hub is imported, e.g. in a subprocess) and the real
client code runs against it: repos are created, files arrive through the preupload and commit endpoints
(every file answered as a regular upload, so it comes inline, base64-encoded). Only `VALID_TOKEN` is accepted.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

VALID_TOKEN = "hf_standin_valid_token"


def validate_front_matter(content: str, repo_type: str) -> list[str]:
    """The checks the Hub makes that matter here: YAML front matter that parses, and a Space's sdk fields."""
    import yaml

    if not content.startswith("---\n") or "\n---" not in content[4:]:
        return ["README.md has no YAML front matter"]
    try:
        meta = yaml.safe_load(content[4:content.index("\n---", 4)])
    except yaml.YAMLError as exc:
        return [f"invalid YAML: {exc}"]
    if not isinstance(meta, dict):
        return ["the front matter is not a mapping"]
    if repo_type == "space":
        return [f"a Space needs `{key}`" for key in ("sdk", "sdk_version", "app_file") if not meta.get(key)]
    return []


class HubStandIn:
    def __init__(self):
        self.repos: dict[tuple[str, str], dict] = {}  # (repo_type, repo_id) -> creation payload
        self.files: dict[tuple[str, str], dict[str, bytes]] = {}  # (repo_type, repo_id) -> {path: content}
        self.requests: list[tuple[str, str]] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _reply(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def do_GET(self):
                stand_in.requests.append(("GET", self.path))
                if self.path.startswith("/api/whoami"):
                    return self._authorised() and self._reply(200, {"name": "standin", "type": "user"})
                self._reply(404, {"error": f"not in the stand-in: GET {self.path}"})

            def do_POST(self):
                stand_in.requests.append(("POST", self.path))
                body = self._body()
                if not self._authorised():
                    return None
                parts = self.path.split("?")[0].strip("/").split("/")
                if parts[:2] == ["api", "validate-yaml"]:  # the README's front matter, as the Hub checks it
                    payload = json.loads(body)
                    errors = validate_front_matter(payload["content"], payload.get("repoType") or "model")
                    return self._reply(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})
                if parts[:3] == ["api", "repos", "create"]:
                    payload = json.loads(body)
                    repo_type = payload.get("type") or "model"
                    repo_id = f"{payload['organization']}/{payload['name']}" if payload.get("organization") else payload["name"]
                    stand_in.repos[(repo_type, repo_id)] = payload
                    stand_in.files.setdefault((repo_type, repo_id), {})
                    prefix = "" if repo_type == "model" else f"{repo_type}s/"
                    return self._reply(200, {"url": f"{stand_in.url}/{prefix}{repo_id}", "name": repo_id, "id": repo_id})
                if parts[0] == "api" and len(parts) >= 6 and parts[-2] in ("preupload", "commit"):
                    repo_type, repo_id = parts[1][:-1], "/".join(parts[2:4])
                    if (repo_type, repo_id) not in stand_in.repos:
                        return self._reply(404, {"error": f"Repository not found: {repo_id}"})
                    if parts[-2] == "preupload":
                        files = json.loads(body)["files"]
                        return self._reply(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                                           for f in files]})
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        if item.get("key") == "file":
                            value = item["value"]
                            stand_in.files[(repo_type, repo_id)][value["path"]] = base64.b64decode(value["content"])
                    return self._reply(200, {"success": True, "commitOid": "0" * 40, "pullRequestUrl": None,
                                             "commitUrl": f"{stand_in.url}/{repo_id}/commit/{'0' * 40}"})
                self._reply(404, {"error": f"not in the stand-in: POST {self.path}"})

            def _authorised(self) -> bool:
                if self.headers.get("Authorization") != f"Bearer {VALID_TOKEN}":
                    self._reply(401, {"error": "Invalid credentials in Authorization header"})
                    return False
                return True

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "HubStandIn":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
