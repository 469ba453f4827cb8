"""A fake Hugging Face Hub on 127.0.0.1 for tests: the real `huggingface_hub` client talks to it.

It implements only the calls `nkv push` / `nkv pull` make, with the status codes, error
headers (X-Error-Code) and download headers (X-Repo-Commit, ETag, Content-Length) the
client relies on:

    POST /api/repos/create                          create_repo
    POST /api/validate-yaml                         create_commit checks README.md front matter
    POST /api/models/{repo}/preupload/{rev}         upload mode per file (always "regular")
    POST /api/models/{repo}/commit/{rev}            NDJSON commit, files inline base64
    POST /api/models/{repo}/branch/{branch}         create_branch
    GET  /api/models/{repo}[/revision/{rev}]        model_info (sha + siblings)
    GET  /api/models/{repo}/tree/{rev}              list_repo_tree / list_repo_files
    HEAD|GET /{repo}/resolve/{rev}/{path}           hf_hub_download

Every request is recorded in `hub.requests` so tests can assert what was sent. `.nkv`
files are served the way the real Hub serves LFS files (ETag = sha256 of the content);
others with the git blob sha1. `hub.corrupt[path] = fn` serves fn(bytes) under the
original ETag, as a damaged transfer would.
"""

from __future__ import annotations

import base64
import hashlib
import json
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

GITATTRIBUTES = b"*.nkv filter=lfs diff=lfs merge=lfs -text\n"


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    owner: str
    private: bool = False
    gated: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # sha -> {path: bytes}
    refs: dict[str, str] = field(default_factory=dict)  # "main", "v1", "refs/pr/1" -> sha

    def resolve(self, rev: str) -> str | None:
        if rev in self.refs:
            return self.refs[rev]
        return rev if rev in self.commits else None


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


class FakeHub:
    """Start with `with FakeHub() as hub:`; `hub.url` is the endpoint, `hub.token` a valid write token."""

    def __init__(self, users: dict[str, str] | None = None):
        self.tokens = users or {"hf_test_write_token": "alice"}  # token -> user name
        self.token = next(iter(self.tokens))
        self.repos: dict[str, Repo] = {}
        self.requests: list[Request] = []
        self.yaml_seen: list[dict] = []
        self.corrupt: dict[str, Callable[[bytes], bytes]] = {}
        self._n = 0
        self._lock = threading.Lock()
        self._connections: list[socket.socket] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        # Keep-alive connections outlive serve_forever; close them so the client really
        # finds no server (tests of the unreachable-Hub path rely on it).
        for conn in self._connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------------ test helpers
    def add_repo(self, repo_id: str, files: dict[str, bytes], *, private: bool = False,
                 gated: bool = False, branch: str = "main") -> str:
        """Create (or extend) a repo with one commit holding `files`; returns its sha."""
        repo = self.repos.get(repo_id) or Repo(owner=repo_id.split("/")[0], private=private, gated=gated)
        self.repos[repo_id] = repo
        base = repo.commits.get(repo.refs.get(branch, ""), {".gitattributes": GITATTRIBUTES})
        return self._commit(repo, branch, {**base, **files})

    def files(self, repo_id: str, rev: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.resolve(rev)]

    def downloads(self) -> list[str]:
        """Paths fetched with GET .../resolve/... (HEAD requests excluded)."""
        return [r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in self.requests
                if r.method == "GET" and "/resolve/" in r.path]

    def _commit(self, repo: Repo, ref: str, files: dict[str, bytes]) -> str:
        with self._lock:
            self._n += 1
            sha = hashlib.sha1(f"commit {self._n} {ref}".encode()).hexdigest()
        repo.commits[sha] = dict(files)
        repo.refs[ref] = sha
        return sha


# ---------------------------------------------------------------------- HTTP handling
def _handler_for(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:  # keep pytest output clean
            pass

        def setup(self) -> None:
            super().setup()
            hub._connections.append(self.connection)

        def do_GET(self) -> None:
            self._dispatch("GET")

        def do_HEAD(self) -> None:
            self._dispatch("HEAD")

        def do_POST(self) -> None:
            self._dispatch("POST")

        # -------------------------------------------------------------- plumbing
        def _dispatch(self, method: str) -> None:
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            req = Request(method, url.path, parse_qs(url.query), {k.lower(): v for k, v in self.headers.items()}, body)
            hub.requests.append(req)
            try:
                self._route(req)
            except Exception as exc:  # a bug in the fake should fail loudly, not hang the client
                self._send(500, {"error": f"fake hub: {type(exc).__name__}: {exc}"})

        def _send(self, status: int, payload: object = None, headers: dict[str, str] | None = None,
                   raw: bytes | None = None) -> None:
            data = raw if raw is not None else json.dumps(payload if payload is not None else {}).encode()
            self.send_response(status)
            self.send_header("Content-Length", str(len(data)))
            if raw is None:
                self.send_header("Content-Type", "application/json")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _error(self, status: int, code: str | None, message: str, extra: dict[str, str] | None = None) -> None:
            headers = {"X-Error-Message": message, **(extra or {})}
            if code:
                headers["X-Error-Code"] = code
            self._send(status, {"error": message}, headers)

        def _user(self, req: Request) -> str | None:
            auth = req.headers.get("authorization", "")
            return hub.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None

        def _repo(self, req: Request, repo_id: str, write: bool = False) -> Repo | None:
            """The repo if this request may see it; otherwise send the Hub's error and return None."""
            user = self._user(req)
            if write and user is None:
                self._error(401, None, "Invalid credentials in Authorization header")
                return None
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and user != repo.owner):
                self._error(404, "RepoNotFound", "Repository not found")
                return None
            if write and user != repo.owner:
                self._error(403, None, "You don't have the rights to write to this repo")
                return None
            if repo.gated and user is None:
                self._error(401, "GatedRepo", "Access to this repo is restricted")
                return None
            return repo

        # -------------------------------------------------------------- routes
        def _route(self, req: Request) -> None:
            p = req.path
            if req.method == "POST" and p == "/api/repos/create":
                return self._create_repo(req)
            if req.method == "POST" and p == "/api/validate-yaml":
                return self._validate_yaml(req)
            if p.startswith("/api/models/"):
                parts = p[len("/api/models/"):].split("/")
                repo_id, rest = "/".join(parts[:2]), [unquote(x) for x in parts[2:]]
                if req.method == "POST" and len(rest) >= 2 and rest[0] == "preupload":
                    return self._preupload(req, repo_id, "/".join(rest[1:]))
                if req.method == "POST" and len(rest) >= 2 and rest[0] == "commit":
                    return self._commit(req, repo_id, "/".join(rest[1:]))
                if req.method == "POST" and len(rest) >= 2 and rest[0] == "branch":
                    return self._branch(req, repo_id, "/".join(rest[1:]))
                if req.method == "GET" and (not rest or rest[0] == "revision"):
                    return self._model_info(req, repo_id, "/".join(rest[1:]) or "main")
                if req.method == "GET" and len(rest) >= 2 and rest[0] == "tree":
                    return self._tree(req, repo_id, rest[1])
            if "/resolve/" in p and req.method in ("GET", "HEAD"):
                repo_id, tail = p.lstrip("/").split("/resolve/", 1)
                rev, _, path = tail.partition("/")
                return self._resolve(req, repo_id, unquote(rev), unquote(path))
            self._error(404, None, f"fake hub: no route for {req.method} {p}")

        def _create_repo(self, req: Request) -> None:
            user = self._user(req)
            if user is None:
                return self._error(401, None, "Invalid credentials in Authorization header")
            payload = json.loads(req.body)
            owner = payload.get("organization") or user
            repo_id = f"{owner}/{payload['name']}"
            if owner != user:
                return self._error(403, None, f"You don't have the rights to create a model under {owner}")
            if repo_id in hub.repos:  # the real Hub's 409 also carries the url; the client reads it
                return self._send(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"},
                                  {"X-Error-Message": "You already created this model repo"})
            private = payload.get("private") or payload.get("visibility") == "private"
            hub.repos[repo_id] = Repo(owner=owner, private=bool(private))
            hub._commit(hub.repos[repo_id], "main", {".gitattributes": GITATTRIBUTES})
            self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _validate_yaml(self, req: Request) -> None:
            content = json.loads(req.body)["content"]
            if not content.startswith("---\n"):
                return self._send(200, {"errors": [], "warnings": [{"message": "empty or missing yaml metadata"}]})
            try:
                meta = yaml.safe_load(content.split("---\n", 2)[1])
            except yaml.YAMLError as exc:
                return self._send(400, {"errors": [{"message": str(exc)}]})
            hub.yaml_seen.append(meta)
            self._send(200, {"errors": [], "warnings": []})

        def _preupload(self, req: Request, repo_id: str, rev: str) -> None:
            repo = self._repo(req, repo_id, write=True)
            if repo is None:
                return
            current = repo.commits.get(repo.resolve(rev) or "", {})
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                      "oid": git_sha1(current[f["path"]]) if f["path"] in current else None}
                     for f in json.loads(req.body)["files"]]
            self._send(200, {"files": files, "commitOid": repo.resolve(rev)})

        def _commit(self, req: Request, repo_id: str, rev: str) -> None:
            repo = self._repo(req, repo_id, write=True)
            if repo is None:
                return
            base = repo.resolve(rev)
            if base is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = dict(repo.commits[base])
            for line in req.body.splitlines():
                item = json.loads(line)
                key, value = item["key"], item["value"]
                if key == "file":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                elif key != "header":  # lfsFile: this fake never asks for LFS uploads
                    return self._error(400, None, f"fake hub: unsupported commit item {key!r}")
            pr = req.query.get("create_pr") == ["1"]
            ref = f"refs/pr/{sum(r.startswith('refs/pr/') for r in repo.refs) + 1}" if pr else rev
            sha = hub._commit(repo, ref, files)
            self._send(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{sha}", "commitOid": sha,
                             "pullRequestUrl": f"{hub.url}/{repo_id}/discussions/{ref.rsplit('/', 1)[1]}"
                             if pr else None})

        def _branch(self, req: Request, repo_id: str, branch: str) -> None:
            repo = self._repo(req, repo_id, write=True)
            if repo is None:
                return
            if branch in repo.refs:
                return self._error(409, None, "Reference already exists")
            start = json.loads(req.body or b"{}").get("startingPoint") or "main"
            repo.refs[branch] = repo.resolve(start)
            self._send(200, {})

        def _model_info(self, req: Request, repo_id: str, rev: str) -> None:
            repo = self._repo(req, repo_id)
            if repo is None:
                return
            sha = repo.resolve(rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            siblings = [{"rfilename": name} for name in sorted(repo.commits[sha])]
            self._send(200, {"id": repo_id, "sha": sha, "private": repo.private, "siblings": siblings,
                             "tags": [], "library_name": "nkv"})

        def _tree(self, req: Request, repo_id: str, rev: str) -> None:
            repo = self._repo(req, repo_id)
            if repo is None:
                return
            sha = repo.resolve(rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            entries = [{"type": "file", "path": name, "size": len(data), "oid": git_sha1(data)}
                       for name, data in sorted(repo.commits[sha].items())]
            self._send(200, entries)

        def _resolve(self, req: Request, repo_id: str, rev: str, path: str) -> None:
            repo = self._repo(req, repo_id)
            if repo is None:
                return
            sha = repo.resolve(rev)
            if sha is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            files = repo.commits[sha]
            if path not in files:
                return self._error(404, "EntryNotFound", f"{path} does not exist", {"X-Repo-Commit": sha})
            data = files[path]
            etag = hashlib.sha256(data).hexdigest() if path.endswith(".nkv") else git_sha1(data)
            served = hub.corrupt[path](data) if path in hub.corrupt else data
            self._send(200, raw=served, headers={"X-Repo-Commit": sha, "ETag": f'"{etag}"',
                                                 "Content-Type": "application/octet-stream"})

    return Handler


# ---------------------------------------------------------------------- client wiring
def point_client_at(monkeypatch, url: str, cache_dir: str, token: str | None) -> None:
    """Aim the already-imported huggingface_hub at `url` with a private cache and token.

    huggingface_hub reads HF_ENDPOINT, HF_HUB_OFFLINE and the cache paths once, at import,
    into `huggingface_hub.constants`; patching those attributes is what takes effect.
    """
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "ENDPOINT", url)
    monkeypatch.setattr(hc, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", cache_dir)
    # A token saved on the developer's machine must not leak into "no token" tests.
    monkeypatch.setattr(hc, "HF_TOKEN_PATH", cache_dir + "-token")
    monkeypatch.setattr(hc, "HF_STORED_TOKENS_PATH", cache_dir + "-stored-tokens")
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    if token is None:
        monkeypatch.delenv("HF_TOKEN", raising=False)
    else:
        monkeypatch.setenv("HF_TOKEN", token)
