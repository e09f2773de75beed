"""A local stand-in for the Hugging Face hub: the part of its HTTP protocol that huggingface_hub's
`HfApi.model_info` and `hf_hub_download` use, served from memory by a thread.

    hub = StandinHub()
    sha = hub.add_repo("org/name", {"walrus.pt": path_or_bytes, "extended_config.yaml": ...})
    url = hub.start()        # set HF_ENDPOINT=url (walrus_jax.checkpoints.hub reads it at call time)
    hub.stop()

Endpoints (what huggingface_hub 1.x/2.x requests):
  GET       /api/models/ORG/NAME/revision/REV[?blobs=True]  {"id", "sha", "siblings": [{"rfilename",
            "size", "blobId", "lfs": {"sha256", "size", "pointerSize"}}]}
  HEAD, GET /ORG/NAME/resolve/REV/FILE   the bytes, with X-Repo-Commit, ETag (the LFS sha256 for
            checkpoint files, a git blob id otherwise) and Content-Length; a GET honours
            `Range: bytes=N-` (206), which is how an interrupted download resumes.
Errors as the hub reports them: 404 + X-Error-Code RepoNotFound / RevisionNotFound / EntryNotFound;
a private repository answers 401 RepoNotFound without a token and 401 "Invalid credentials in
Authorization header" with a wrong one. `stall("ORG/NAME/FILE", after_bytes)` makes a GET of that file hang
after that many bytes until `release()` (to kill a client in the middle of a download).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import threading
import urllib.parse

LFS_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")


class _Blob:
    """A served file: bytes in memory, or a path read as it is sent (a 5 GB checkpoint stays on disk)."""

    def __init__(self, src):
        if isinstance(src, (bytes, bytearray)):
            self.data, self.path, self.size = bytes(src), None, len(src)
        else:
            self.data, self.path, self.size = None, os.fspath(src), os.path.getsize(src)
        self._hashes: dict[str, str] = {}

    def chunks(self, start: int = 0, step: int = 1 << 20):
        if self.data is not None:
            for i in range(start, self.size, step):
                yield self.data[i:i + step]
            return
        with open(self.path, "rb") as f:
            f.seek(start)
            while chunk := f.read(step):
                yield chunk

    def digest(self, kind: str) -> str:
        """"sha256" (an LFS file's ETag) or "git" (the git blob id of a small file), computed once."""
        if kind not in self._hashes:
            h = hashlib.sha256() if kind == "sha256" else hashlib.sha1(b"blob %d\0" % self.size)
            for chunk in self.chunks():
                h.update(chunk)
            self._hashes[kind] = h.hexdigest()
        return self._hashes[kind]


class StandinHub:
    def __init__(self):
        self.repos: dict[str, dict] = {}  # repo -> {"refs": {rev: sha}, "commits": {sha: {file: _Blob}}, "token"}
        self.log: list[tuple[str, str, dict]] = []  # (method, path, selected request headers)
        self.sent: dict[str, int] = {}  # "ORG/NAME/FILE" -> bytes sent by GETs so far
        self._stalls: dict[str, int] = {}
        self._go = threading.Event()
        self._server = None

    # ------------------------------------------------------------------ content
    def add_repo(self, repo_id: str, files: dict, *, revision: str = "main", token: str | None = None) -> str:
        """Adds (or adds a commit to) a repository; returns the new commit's hash."""
        content = {name: _Blob(src) for name, src in files.items()}
        repo = self.repos.get(repo_id, {"commits": {}})
        digest = hashlib.sha1(repr(sorted((k, v.size, v.path or v.digest("git")) for k, v in content.items()))
                              .encode() + f"{repo_id}@{revision}#{len(repo['commits'])}".encode()).hexdigest()
        repo = self.repos.setdefault(repo_id, {"refs": {}, "commits": {}, "token": token})
        repo["commits"][digest] = content
        repo["refs"][revision] = digest
        return digest

    def stall(self, repo_file: str, after_bytes: int) -> None:
        """GETs of "ORG/NAME/FILE" hang once that many bytes of it were sent, until release()."""
        self._go.clear()
        self._stalls[repo_file] = after_bytes

    def release(self) -> None:
        self._stalls.clear()
        self._go.set()

    def requests(self, method: str | None = None, contains: str = "") -> list:
        return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]

    # ------------------------------------------------------------------ server
    def start(self) -> str:
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def do_HEAD(self):
                hub._handle(self, head=True)

            def do_GET(self):
                hub._handle(self, head=False)

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self.release()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    # ------------------------------------------------------------------ protocol
    @staticmethod
    def _send(h, status: int, headers: dict, body: bytes = b"", head: bool = False) -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, str(v))
        h.send_header("Content-Length", str(len(body)))
        h.end_headers()
        if not head and body:
            h.wfile.write(body)

    def _error(self, h, status: int, code: str | None, head: bool, message: str | None = None) -> None:
        headers = {"Content-Type": "application/json"}
        if code:
            headers["X-Error-Code"] = code
        if message:
            headers["X-Error-Message"] = message
        self._send(h, status, headers, json.dumps({"error": message or code or "error"}).encode(), head)

    def _repo(self, h, repo_id: str, head: bool):
        repo = self.repos.get(repo_id)
        auth = h.headers.get("Authorization", "")
        if repo is None:
            self._error(h, 404 if not auth else 401, "RepoNotFound", head)
            return None
        if repo["token"] is not None and auth != f"Bearer {repo['token']}":
            if auth:
                self._error(h, 401, None, head, "Invalid credentials in Authorization header")
            else:
                self._error(h, 401, "RepoNotFound", head)
            return None
        return repo

    @staticmethod
    def _commit(repo, rev: str):
        sha = repo["refs"].get(rev, rev if rev in repo["commits"] else None)
        return sha, (repo["commits"].get(sha) if sha else None)

    def _revision(self, h, repo_id: str, rev: str, head: bool):
        """(repo, sha, files) of `repo_id` at `rev`, or None after answering with the hub's error."""
        repo = self._repo(h, repo_id, head)
        if repo is None:
            return None
        sha, files = self._commit(repo, rev)
        if files is None:
            self._error(h, 404, "RevisionNotFound", head)
            return None
        return repo, sha, files

    @staticmethod
    def _etag(name: str, blob: _Blob) -> tuple[str, dict | None]:
        if name.endswith(LFS_SUFFIXES) or blob.size > 10 << 20:
            sha = blob.digest("sha256")
            return sha, {"sha256": sha, "size": blob.size, "pointerSize": 134}
        return blob.digest("git"), None

    def _handle(self, h, head: bool) -> None:
        url = urllib.parse.urlsplit(h.path)
        path = urllib.parse.unquote(url.path)
        self.log.append(("HEAD" if head else "GET", path,
                         {k: h.headers[k] for k in ("Range", "Authorization") if k in h.headers}))
        m = re.match(r"^/api/models/([^/]+/[^/]+)/revision/(.+)$", path)
        if m:
            found = self._revision(h, m.group(1), m.group(2), head)
            if found is None:
                return
            repo, sha, files = found
            siblings = []
            for name, data in sorted(files.items()):
                blob, lfs = self._etag(name, data)
                siblings.append({"rfilename": name, "size": data.size, "blobId": blob, **({"lfs": lfs} if lfs else {})})
            body = json.dumps({"id": m.group(1), "modelId": m.group(1), "sha": sha, "private": repo["token"] is not None,
                               "siblings": siblings}).encode()
            return self._send(h, 200, {"Content-Type": "application/json"}, body, head)
        m = re.match(r"^/([^/]+/[^/]+)/resolve/([^/]+)/(.+)$", path)
        if not m:
            return self._error(h, 404, None, head, "no such endpoint")
        found = self._revision(h, m.group(1), m.group(2), head)
        if found is None:
            return
        repo, sha, files = found
        name = m.group(3)
        if name not in files:
            return self._error(h, 404, "EntryNotFound", head)
        data = files[name]
        etag, _ = self._etag(name, data)
        headers = {"X-Repo-Commit": sha, "ETag": f'"{etag}"', "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        start = 0
        rng = re.match(r"bytes=(\d+)-$", h.headers.get("Range", ""))
        if rng and not head:
            start = int(rng.group(1))
            headers["Content-Range"] = f"bytes {start}-{data.size - 1}/{data.size}"
        if head:
            h.send_response(200)
            for k, v in headers.items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(data.size))
            h.end_headers()
            return
        h.send_response(206 if start else 200)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(data.size - start))
        h.end_headers()
        key = f"{m.group(1)}/{name}"
        limit = self._stalls.get(key)
        for chunk in data.chunks(start, 64 * 1024):
            if limit is not None and self.sent.get(key, 0) >= limit:
                h.wfile.flush()
                self._go.wait(120)
                h.close_connection = True
                return
            h.wfile.write(chunk)
            self.sent[key] = self.sent.get(key, 0) + len(chunk)


def released_files(cfg, seed: int = 0, vocab=None, checkpoint_name: str = "walrus.pt") -> dict:
    """{checkpoint_name: torch.save({"app": {"model": state_dict}}), "extended_config.yaml": ...}: a
    random-weight model of ModelConfig `cfg` in the released layout, with the released field
    vocabulary (or `vocab`) as data.field_index_map_override."""
    import io

    import numpy as np
    import torch
    import yaml

    from walrus_jax.checkpoints import convert
    from walrus_jax.checkpoints.params import random_model
    from walrus_jax.data.fields import RELEASED_FIELD_INDEX_MAP

    state_dict = convert.to_state_dict(random_model(cfg, seed=seed, scale=0.5))
    buf = io.BytesIO()
    torch.save({"app": {"model": {k: torch.from_numpy(np.array(v)) for k, v in state_dict.items()}}}, buf)
    model_section = {
        "hidden_dim": cfg.hidden_dim, "intermediate_dim": cfg.intermediate_dim, "processor_blocks": cfg.n_blocks,
        "groups": cfg.groups, "n_states": cfg.n_states, "include_d": list(cfg.include_d), "causal_in_time": True,
        "jitter_patches": True, "drop_path": cfg.drop_path, "input_field_drop": 0.0, "projection_dim": 48,
        "max_d": 3, "use_periodic_fixed_jitter": True,
        "processor": {"space_mixing": {"num_heads": cfg.num_heads, "mlp_dim": None},
                      "time_mixing": {"num_heads": cfg.num_heads, "bias_type": "rel"}},
        "encoder": {"learned_pad": True, "activation": {"_target_": "torch.nn.SiLU"},
                    "base_kernel_size2d": [[8, 4], [8, 4]], "base_kernel_size3d": [[8, 4], [8, 4], [8, 4]]},
        "decoder": {"learned_pad": True},
    }
    doc = {"model": model_section, "data": {"field_index_map_override": dict(vocab or RELEASED_FIELD_INDEX_MAP)}}
    return {checkpoint_name: buf.getvalue(), "extended_config.yaml": yaml.safe_dump(doc).encode()}
