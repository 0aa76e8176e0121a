"""A local stand-in for the part of the Hugging Face Hub HTTP API that `huggingface_hub` uses to push.

Standard library only: a `ThreadingHTTPServer` on 127.0.0.1 (a free port) in a daemon thread.
It keeps repos, branches and commits in memory so tests can assert what arrived. Implemented
(as `huggingface_hub` 2.x calls them):

- `POST /api/repos/create`                          HfApi.create_repo (409 when it exists)
- `GET  /api/models/{repo}[/revision/{rev}]`        HfApi.repo_info / model_info
- `POST /api/validate-yaml`                         README.md metadata check inside create_commit
- `POST /api/models/{repo}/preupload/{rev}`         upload modes: always "regular", so file content
                                                    travels inline (base64) in the commit body and no
                                                    LFS / Xet transfer is needed
- `POST /api/models/{repo}/commit/{rev}`            ndjson commit: header, file, deletedFile lines
- `POST /api/models/{repo}/branch/{name}`           HfApi.create_branch (409 when it exists)
- `GET  /api/whoami-v2`                             HfApi.whoami

Every request must carry `Authorization: Bearer <token>`; otherwise 401 with the Hub's
"Invalid credentials" error. `reject_all_tokens = True` makes every request a 401, and that error
echoes the Authorization header it got (as some proxies do), so tests can prove the client side
never prints the token. `fail_next_commits = n` answers the next n commit requests with a 500.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.safetensors filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_sha1(content: bytes) -> str:
    """The git object id of a blob, as the Hub reports it for regular files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass
class Commit:
    oid: str
    branch: str
    message: str
    description: str
    parent: str | None
    files: dict[str, bytes]  # the whole tree after this commit
    changed: list[str]  # paths this commit added or replaced


@dataclass
class Repo:
    repo_id: str
    private: bool
    branches: dict[str, str] = field(default_factory=dict)  # branch -> head commit oid
    commits: dict[str, Commit] = field(default_factory=dict)
    history: list[Commit] = field(default_factory=list)  # in the order they were made


class HubError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.message, self.code, self.extra = status, message, code, extra


class FakeHub:
    """Start with `with FakeHub(token) as hub:`; point huggingface_hub at `hub.endpoint`."""

    def __init__(self, token: str, user: str = "tester"):
        self.token = token
        self.user = user
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path) of every request received
        self.reject_all_tokens = False
        self.fail_next_commits = 0
        self._lock = threading.Lock()
        self._oids = itertools.count(1)
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()

    # --- what tests assert on -------------------------------------------------------------

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.branches.get(revision, revision)].files)

    def commits(self, repo_id: str) -> list[Commit]:
        """Commits made through the API (the repo's initial commit left out), oldest first."""
        return self.repos[repo_id].history[1:]

    # --- request handling ------------------------------------------------------------------

    def handle(self, method: str, path: str, headers, body: bytes) -> tuple[int, dict, dict[str, str]]:
        self.requests.append((method, path))
        auth = headers.get("Authorization", "")
        if self.reject_all_tokens or auth != f"Bearer {self.token}":
            message = "Invalid credentials in Authorization header"
            return 401, {"error": f"{message} (got {auth!r})"}, {"X-Error-Message": message}
        try:
            with self._lock:
                return 200, self._route(method, path, body), {}
        except HubError as err:
            error_headers = {"X-Error-Code": err.code} if err.code else {}
            return err.status, {"error": err.message, **err.extra}, error_headers

    def _route(self, method: str, path: str, body: bytes) -> dict:
        parts = [unquote(p) for p in urlsplit(path).path.strip("/").split("/")]
        if method == "POST" and parts == ["api", "repos", "create"]:
            return self._create_repo(json.loads(body))
        if method == "POST" and parts == ["api", "validate-yaml"]:
            return self._validate_yaml(json.loads(body))
        if method == "GET" and parts == ["api", "whoami-v2"]:
            return {"name": self.user, "type": "user", "auth": {"type": "access_token"}}
        if len(parts) >= 4 and parts[:2] == ["api", "models"]:
            repo = self._repo(f"{parts[2]}/{parts[3]}")
            action, revision = (parts[4], "/".join(parts[5:])) if len(parts) > 5 else (None, None)
            if method == "GET" and action in (None, "revision"):
                return self._repo_info(repo, revision or "main")
            if method == "POST" and action == "preupload":
                return self._preupload(repo, revision, json.loads(body))
            if method == "POST" and action == "commit":
                return self._commit(repo, revision, body)
            if method == "POST" and action == "branch":
                return self._create_branch(repo, revision, json.loads(body or b"{}"))
        raise HubError(404, f"fake hub: no route for {method} {path}")

    def _repo(self, repo_id: str) -> Repo:
        if repo_id not in self.repos:
            raise HubError(404, "Repository not found", "RepoNotFound")
        return self.repos[repo_id]

    def _head(self, repo: Repo, revision: str) -> Commit:
        oid = repo.branches.get(revision, revision)
        if oid not in repo.commits:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[oid]

    def _new_commit(self, repo: Repo, branch: str, message: str, description: str, files: dict, changed) -> Commit:
        oid = hashlib.sha1(f"{repo.repo_id}:{next(self._oids)}".encode()).hexdigest()
        commit = Commit(oid, branch, message, description, repo.branches.get(branch), files, list(changed))
        repo.commits[oid] = commit
        repo.history.append(commit)
        repo.branches[branch] = oid
        return commit

    def _create_repo(self, payload: dict) -> dict:
        repo_id = f"{payload.get('organization') or self.user}/{payload['name']}"
        if payload.get("type", "model") != "model":
            raise HubError(400, "fake hub: model repos only")
        if repo_id in self.repos:
            # create_repo(exist_ok=True) reads the url from this 409 answer
            raise HubError(409, "You already created this model repo", url=f"{self.endpoint}/{repo_id}")
        repo = Repo(repo_id, private=payload.get("visibility") == "private")
        self.repos[repo_id] = repo
        self._new_commit(repo, "main", "initial commit", "", {".gitattributes": GITATTRIBUTES}, [".gitattributes"])
        return {"url": f"{self.endpoint}/{repo_id}", "name": repo_id, "id": repo_id}

    def _validate_yaml(self, payload: dict) -> dict:
        content = payload["content"]
        if content.startswith("---"):
            front = content.split("---", 2)[1]
            try:
                meta = yaml.safe_load(front)
            except yaml.YAMLError as err:
                raise HubError(400, f"invalid YAML: {err}") from err
            if not isinstance(meta, dict):
                raise HubError(400, "metadata must be a YAML mapping")
        return {"errors": [], "warnings": []}

    def _repo_info(self, repo: Repo, revision: str) -> dict:
        commit = self._head(repo, revision)
        return {
            "id": repo.repo_id,
            "sha": commit.oid,
            "private": repo.private,
            "siblings": [{"rfilename": name} for name in sorted(commit.files)],
        }

    def _preupload(self, repo: Repo, revision: str, payload: dict) -> dict:
        existing = self._head(repo, revision).files
        return {
            "files": [
                {
                    "path": f["path"],
                    "uploadMode": "regular",
                    "shouldIgnore": False,
                    "oid": git_blob_sha1(existing[f["path"]]) if f["path"] in existing else None,
                }
                for f in payload["files"]
            ]
        }

    def _commit(self, repo: Repo, branch: str, body: bytes) -> dict:
        if branch not in repo.branches:
            raise HubError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
        if self.fail_next_commits > 0:
            self.fail_next_commits -= 1
            raise HubError(500, "fake hub: injected server error")
        files = dict(repo.commits[repo.branches[branch]].files)
        header, changed = {}, []
        for line in body.decode().splitlines():
            item = json.loads(line)
            key, value = item["key"], item["value"]
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding") != "base64":
                    raise HubError(400, "fake hub: file content must be base64")
                files[value["path"]] = base64.b64decode(value["content"])
                changed.append(value["path"])
            elif key == "deletedFile":
                files.pop(value["path"], None)
            else:
                raise HubError(400, f"fake hub: unsupported commit operation {key!r} (regular files only)")
        if not header.get("summary"):
            raise HubError(400, "commit header with a summary is required")
        commit = self._new_commit(repo, branch, header["summary"], header.get("description", ""), files, changed)
        return {"commitUrl": f"{self.endpoint}/{repo.repo_id}/commit/{commit.oid}", "commitOid": commit.oid, "success": True}

    def _create_branch(self, repo: Repo, branch: str, payload: dict) -> dict:
        if branch in repo.branches:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}")
        start = self._head(repo, payload.get("startingPoint") or "main")
        repo.branches[branch] = start.oid
        return {}


def _make_handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, payload, response_headers = hub.handle(method, self.path, self.headers, body)
            data = json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            for key, value in response_headers.items():
                self.send_header(key, value)
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            self._serve("GET")

        def do_POST(self) -> None:  # noqa: N802
            self._serve("POST")

        def log_message(self, format, *args) -> None:  # keep test output clean
            pass

    return Handler
