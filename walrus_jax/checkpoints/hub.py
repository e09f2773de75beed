"""Pretrained Walrus by name: a hub repository (or a local folder) -> a model, converted once.

    model = wj.from_pretrained("polymathic-ai/walrus")                  # the released 1.3B model
    model = wj.from_pretrained("polymathic-ai/walrus_ft_CE-RM", dtype="bfloat16")
    model = wj.from_pretrained("hf://polymathic-ai/walrus@main")        # an hf:// URL, @revision
    model = wj.from_pretrained("downloads/walrus/")                     # the released layout on disk
    model = wj.from_pretrained("ckpt/")                                 # a converted directory or a workdir
    wj.list_pretrained()                                                # the known repositories
    path = resolve("polymathic-ai/walrus")                              # the converted directory

`name_or_path` is, in this order:
  * an existing local directory: a converted checkpoint (it holds walrus_jax_pretrained.json), a
    training workdir, or a folder in the released layout (one .pt / .pth / .safetensors file +
    extended_config.yaml), which is converted once into the cache below;
  * `hf://ORG/NAME[@REVISION]` or `ORG/NAME` (revision= or "main"): a model repository on the hub.

A repository is resolved to a commit (one API call; offline or without network, the last commit
this cache saw for that revision), its checkpoint file chosen (.pt, then .pth, then .safetensors:
the released formats first), the file and extended_config.yaml downloaded through huggingface_hub
(its cache and settings: HF_HOME / HF_HUB_CACHE, HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE), then
converted by tools.convert_torch_ckpt (streaming, one block at a time; finetuning_mods checked, the
vocabulary from data.field_index_map_override, the 66 <-> 64 resize switched on for checkpoints
trained on post_neutron_star_merger) into

    $WALRUS_JAX_PRETRAINED_CACHE (default ~/.cache/walrus_jax/pretrained)/
      ORG--NAME/KEY/             the converted directory (walrus_jax.checkpoints.pretrained); KEY is
                                 the checkpoint file's stem + a hash of both files' content hashes
      ORG--NAME/refs/REVISION    {"commit", "key", ...}: where a revision (and its commit) last resolved
      local/KEY/                 conversions of local released-layout folders (KEY from their paths,
                                 sizes and modification times)

so later calls (and later commits that keep the same files) load the converted copy: nothing is
downloaded or converted again, and torch is not imported. Repairs: a dropped connection resumes
within the process (huggingface_hub retries with a byte range); a download whose process was
killed starts again, and the partial file it left in huggingface_hub's cache is removed once the
blob is complete (_remove_orphaned_downloads); an interrupted conversion leaves only a hidden
.KEY.partial-* folder, which the next call removes before converting; a converted directory found
damaged (missing parameter groups, unreadable arrays) is removed and converted again. A lock file per
KEY keeps two processes from converting the same checkpoint at once.

Sharing: `save_pretrained(model or workdir, DIR)` writes walrus_jax's own format (a converted
directory; for a LoRA run only its adapters and the base they name) and `push_to_hub(DIR, repo_id)`
uploads it; `from_pretrained` loads such a repository as it is, without converting.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
from typing import Any, Callable, Iterator, Mapping

from walrus_jax.errors import DataError, HubError, PathError, UserError

log = logging.getLogger(__name__)

CACHE_ENV = "WALRUS_JAX_PRETRAINED_CACHE"
CONFIG_NAME = "extended_config.yaml"
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors")  # in order of preference
DEFAULT_REVISION = "main"
BASE_FILE = "walrus_jax_base.json"  # an adapter delta's base: {"base": ORG/NAME@COMMIT or a path, ...}
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclasses.dataclass(frozen=True)
class Pretrained:
    """One known repository (README's model zoo)."""
    repo_id: str
    description: str  # what it was trained or fine-tuned on
    dims: str  # "2D", "3D" or "2D + 3D"
    notes: str = ""


KNOWN = (
    Pretrained("polymathic-ai/walrus", "the released 1.3B model, pretrained on 19 datasets (18 of The "
               "Well, one of FlowBench); 67-field vocabulary", "2D + 3D"),
    Pretrained("polymathic-ai/walrus_ft_CE-RM", "fine-tuned on compressible Euler, Richtmyer-Meshkov "
               "instability (PDEgym CE-RM)", "2D"),
    Pretrained("polymathic-ai/walrus_ft_CNS3D_64_Turb", "fine-tuned on PDEBench 3D compressible "
               "Navier-Stokes, turbulent, 64^3", "3D"),
    Pretrained("polymathic-ai/walrus_ft_CNS3D_128_Rand", "fine-tuned on PDEBench 3D compressible "
               "Navier-Stokes, random initial conditions, 128^3", "3D"),
    Pretrained("polymathic-ai/walrus_ft_flowbench_skelenton", "fine-tuned on FlowBench flow around "
               "skeleton-shaped obstacles", "2D"),
    Pretrained("polymathic-ai/walrus_ft_post_neutron_star_merger", "fine-tuned on The Well's "
               "post_neutron_star_merger", "3D", "last axis resized 66 -> 64 and back (cfg.resize_66_to_64)"),
    Pretrained("polymathic-ai/walrus_ft_convective_envelope_rsg", "fine-tuned on The Well's "
               "convective_envelope_rsg (red supergiant envelope)", "3D"),
    Pretrained("polymathic-ai/walrus_ft_pdearena_ins", "fine-tuned on PDEArena incompressible "
               "Navier-Stokes (smoke, buoyancy)", "2D"),
    Pretrained("polymathic-ai/walrus_ft_bubbleML_poolBoil", "fine-tuned on BubbleML pool boiling", "2D"),
)


def list_pretrained() -> list[Pretrained]:
    """The known repositories (any repository in the same layout loads as well)."""
    return list(KNOWN)


# ------------------------------------------------------------------------------ cache layout
def cache_root() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get(CACHE_ENV)
                                              or os.path.join("~", ".cache", "walrus_jax", "pretrained")))


def _safe_name(text: str) -> str:
    return re.sub(r"[^\w.-]", "_", text)


def _key(checkpoint_name: str, *hashes: str) -> str:
    """The cache key of a conversion: the checkpoint's stem and a hash of its inputs' identities."""
    stem = _safe_name(os.path.splitext(os.path.basename(checkpoint_name))[0])
    return f"{stem}-{hashlib.sha256('|'.join(hashes).encode()).hexdigest()[:16]}"


def _complete(directory: str) -> bool:
    """True when `directory` is a complete conversion: the marker reads and every parameter group it
    lists has files (a cheap check; unreadable arrays are found while loading)."""
    from walrus_jax.checkpoints import pretrained

    if not os.path.isdir(directory):
        return False
    try:
        meta = pretrained.read_marker(directory)
    except (UserError, OSError):
        return False
    params = os.path.join(directory, pretrained.PARAMS_DIR)
    return all(os.path.isdir(os.path.join(params, g)) and os.listdir(os.path.join(params, g))
               for g in meta.get("groups", ()))


@contextlib.contextmanager
def _locked(directory: str) -> Iterator[None]:
    """An exclusive lock for converting into `directory` (an OS file lock: a killed holder releases it)."""
    from filelock import FileLock

    parent, name = os.path.split(directory)
    os.makedirs(parent, exist_ok=True)
    with FileLock(os.path.join(parent, f".{name}.lock")):
        yield


def _convert_into(directory: str, checkpoint: str, config: str, log_fn: Callable[[str], None]) -> str:
    """Converts (checkpoint, config) into `directory`, replacing what an interrupted or damaged earlier
    attempt left. The caller holds the directory's lock, so any temporary folder is a dead one's."""
    from tools.convert_torch_ckpt import cli
    from walrus_jax.checkpoints import pretrained

    parent, name = os.path.split(directory)
    for entry in os.listdir(parent):
        if entry.startswith(f".{name}{pretrained.PARTIAL_TAG}"):
            log_fn(f"removing {os.path.join(parent, entry)} (left by an interrupted conversion)")
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    if os.path.lexists(directory):
        log_fn(f"{directory} is incomplete or damaged: converting again")
        shutil.rmtree(directory)
    return cli.convert(checkpoint, config, directory, log=log_fn)


def _ensure_converted(directory: str, checkpoint: Callable[[], tuple[str, str]], log_fn) -> str:
    """`directory` when it is complete; else (checkpoint file, config file) = checkpoint() (which may
    download) converted into it, once, under its lock."""
    if _complete(directory):
        return directory
    with _locked(directory):
        if not _complete(directory):  # another process may have finished it while we waited
            ckpt, cfg = checkpoint()
            _convert_into(directory, ckpt, cfg, log_fn)
    return directory


def in_cache(path: str) -> bool:
    """True when `path` is a conversion this module made (and may remove and make again)."""
    root = cache_root()
    return os.path.realpath(path).startswith(os.path.realpath(root) + os.sep)


# ------------------------------------------------------------------------------ names
def parse_repo(name: str, revision: str | None = None, what: str = "name_or_path") -> tuple[str, str]:
    """(repo id, revision) of `ORG/NAME`, `hf://ORG/NAME` or `hf://ORG/NAME@REVISION`; PathError when
    `name` is none of these (a local path that does not exist, most likely)."""
    text = str(name)
    body = text[len("hf://"):] if text.startswith("hf://") else text
    if body.startswith("models/"):
        body = body[len("models/"):]
    rev = None
    if "@" in body:
        body, rev = body.split("@", 1)
    body = body.strip("/") if text.startswith("hf://") else body
    if not _REPO_ID.match(body) or rev == "":
        raise PathError(f"{what}={text!r} does not exist and is not a hub repository id (ORG/NAME, "
                        "hf://ORG/NAME[@REVISION]); expected a converted checkpoint directory, a walrus_jax "
                        "workdir, a folder holding a checkpoint and extended_config.yaml, or a repository")
    if rev is not None and revision is not None and rev != revision:
        raise PathError(f"{what}={text!r} names revision {rev!r} but revision={revision!r} was given")
    return body, rev or revision or DEFAULT_REVISION


def is_repo_reference(name: str) -> bool:
    """True for a string that names a hub repository rather than an existing local path."""
    text = str(name)
    if text.startswith("hf://"):
        return True
    return not os.path.exists(os.path.expanduser(text)) and bool(_REPO_ID.match(text.split("@", 1)[0]))


def _choose_checkpoint(names, where: str) -> str:
    """The checkpoint file among a folder's top-level `names` (module docstring's preference)."""
    for suffix in CHECKPOINT_SUFFIXES:
        found = sorted(n for n in names if "/" not in n and n.endswith(suffix))
        if len(found) == 1:
            return found[0]
        if len(found) > 1:
            raise DataError(f"{where} holds several {suffix} checkpoints {found}; walrus_jax cannot tell which "
                            "one is the model (keep one per folder)")
    raise DataError(f"{where} holds no checkpoint ({', '.join('*' + s for s in CHECKPOINT_SUFFIXES)}); its "
                    f"files: {sorted(names)[:12]}")


# ------------------------------------------------------------------------------ local folders
def _resolve_local(path: str, what: str, log_fn) -> str:
    """A local directory: converted / workdir as they are; the released layout converted once."""
    from walrus_jax.checkpoints import pretrained
    from walrus_jax.checkpoints.load import checkpoint_dir

    if os.path.isfile(path) and path.endswith(CHECKPOINT_SUFFIXES) and \
            os.path.isfile(os.path.join(os.path.dirname(path) or ".", CONFIG_NAME)):
        folder, names = os.path.dirname(path) or ".", [os.path.basename(path)]
    elif os.path.isdir(path) and not os.path.isfile(os.path.join(path, pretrained.MARKER)) \
            and checkpoint_dir(path) is None and os.path.isfile(os.path.join(path, CONFIG_NAME)):
        folder, names = path, os.listdir(path)
    else:
        return path  # a converted directory, a workdir, or something the loader explains
    ckpt = os.path.join(folder, _choose_checkpoint(names, f"{what}={path!r}"))
    cfg = os.path.join(folder, CONFIG_NAME)
    ids = [f"{os.path.realpath(p)}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p in (ckpt, cfg)]
    out = os.path.join(cache_root(), "local", _key(ckpt, *ids))
    return _ensure_converted(out, lambda: (ckpt, cfg), log_fn)


# ------------------------------------------------------------------------------ the hub
def _hf():
    try:
        import huggingface_hub
        import huggingface_hub.constants  # noqa: F401 - lazy submodules, used below
        import huggingface_hub.errors  # noqa: F401
    except ImportError as e:
        raise UserError("loading from the hub needs the huggingface_hub package (pip install huggingface_hub)") from e
    return huggingface_hub


def _endpoint(hf) -> str:
    # Read at call time: huggingface_hub reads HF_ENDPOINT once, when it is first imported.
    return (os.environ.get("HF_ENDPOINT") or hf.constants.ENDPOINT).rstrip("/")


def _offline(hf) -> bool:
    env = (os.environ.get("HF_HUB_OFFLINE") or "").strip().lower() in ("1", "true", "yes", "on")
    mode = getattr(hf.constants, "is_offline_mode", None)  # a function in recent versions, a constant before
    return env or bool(mode() if callable(mode) else hf.constants.HF_HUB_OFFLINE)


def _is_network_error(e: BaseException) -> bool:
    names = {c.__name__ for c in type(e).__mro__}
    return bool(names & {"TransportError", "ConnectError", "TimeoutException", "NetworkError",
                         "OfflineModeIsEnabled", "ConnectionError"})


def _hub_error(e: BaseException, repo_id: str, revision: str, endpoint: str) -> UserError | None:
    """One clear line for a failure of the hub (None: not one this module explains)."""
    from huggingface_hub import errors as hfe

    where = f"{repo_id}@{revision} on {endpoint}"
    status = getattr(getattr(e, "response", None), "status_code", None)
    if isinstance(e, hfe.GatedRepoError):
        return HubError(f"{where}: the repository is gated; accept its terms on the hub and set HF_TOKEN (or "
                        "`hf auth login`)")
    if isinstance(e, hfe.RevisionNotFoundError):
        return HubError(f"{where}: revision {revision!r} does not exist in {repo_id} (a branch, tag or commit "
                        "hash is expected)")
    if isinstance(e, hfe.RepositoryNotFoundError):
        return HubError(f"{where}: no such model repository (or it is private and no valid token was given: "
                        "set HF_TOKEN or `hf auth login`); wj.list_pretrained() lists the known ones")
    if isinstance(e, hfe.HfHubHTTPError) and status in (401, 403):
        return HubError(f"{where}: the hub refused the credentials (HTTP {status}); check HF_TOKEN or "
                        "`hf auth login`")
    if isinstance(e, hfe.EntryNotFoundError) and not isinstance(e, hfe.LocalEntryNotFoundError):
        return HubError(f"{where}: a file listed by the repository cannot be downloaded "
                        f"({(str(e).splitlines() or [''])[0][:200]})")
    if isinstance(e, hfe.HfHubHTTPError):
        return HubError(f"{where}: the hub answered HTTP {status} ({(str(e).splitlines() or [''])[0][:200]})")
    return None


def _ref_path(repo_dir: str, revision: str) -> str:
    return os.path.join(repo_dir, "refs", _safe_name(revision))


def _write_ref(repo_dir: str, revision: str, record: Mapping[str, Any]) -> None:
    path = _ref_path(repo_dir, revision)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(dict(record), f, indent=1)
    os.replace(tmp, path)  # atomic: a reader sees the old record or the new one


def _from_ref(repo_id: str, revision: str, repo_dir: str, why: str) -> str:
    """The conversion a revision last resolved to, when the hub cannot be asked."""
    try:
        with open(_ref_path(repo_dir, revision)) as f:
            record = json.load(f)
        out = record["snapshot"] if record.get("snapshot") else os.path.join(repo_dir, record["key"])
    except (OSError, ValueError, KeyError, TypeError):
        out = None
    if out is None or not (_complete(out) or _is_adapter_folder(out)):
        raise HubError(f"{repo_id}@{revision}: {why}, and no converted copy is cached in {repo_dir} (load it once "
                       "with network access first)")
    log.info("%s@%s: %s; using the cached conversion %s", repo_id, revision, why, out)
    return out


def _remove_orphaned_downloads(path: str, log_fn) -> None:
    """Removes what killed downloads of the blob behind `path` left in huggingface_hub's cache.

    huggingface_hub downloads into a file unique to the process (blobs/ETAG.UUID.incomplete), under a
    lock per blob (.locks/REPO/ETAG.lock), and restarts rather than resumes a download whose process
    died: a process killed in the middle leaves its part of a 5 GB file there for good. With the blob
    complete and its lock free, no download of it is running, so any such file is an orphan."""
    from filelock import FileLock, Timeout

    blob = os.path.realpath(path)
    blobs, etag = os.path.split(blob)
    storage = os.path.dirname(blobs)
    lock = os.path.join(os.path.dirname(storage), ".locks", os.path.basename(storage), f"{etag}.lock")
    orphans = [f for f in os.listdir(blobs) if f.startswith(etag + ".") and f.endswith(".incomplete")]
    if not orphans or not os.path.exists(lock):
        return
    try:
        with FileLock(lock, timeout=0):
            for f in orphans:
                size = os.path.getsize(os.path.join(blobs, f))
                os.remove(os.path.join(blobs, f))
                log_fn(f"removed {os.path.join(blobs, f)} ({size:,} bytes left by an interrupted download)")
    except (Timeout, OSError):
        pass  # a download of this blob is running, or the file went away: leave it


def _content_hash(sibling) -> str:
    lfs = getattr(sibling, "lfs", None)
    sha = (lfs.get("sha256") if isinstance(lfs, Mapping) else getattr(lfs, "sha256", None)) if lfs else None
    return sha or getattr(sibling, "blob_id", None) or f"size:{getattr(sibling, 'size', None)}"


def _resolve_repo(repo_id: str, revision: str, token, log_fn) -> str:
    hf = _hf()
    endpoint = _endpoint(hf)
    repo_dir = os.path.join(cache_root(), repo_id.replace("/", "--"))
    if _offline(hf):
        return _from_ref(repo_id, revision, repo_dir, "offline mode (HF_HUB_OFFLINE)")
    try:
        info = hf.HfApi(endpoint=endpoint, token=token).model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as e:  # noqa: BLE001 - sorted below: network, hub answer, or a bug
        if _is_network_error(e):
            return _from_ref(repo_id, revision, repo_dir, f"the hub at {endpoint} cannot be reached "
                             f"({type(e).__name__}: {' '.join(str(e).split())[:160]})")
        err = _hub_error(e, repo_id, revision, endpoint)
        if err is None:
            raise
        raise err from e
    files = {s.rfilename: s for s in (info.siblings or ())}
    where = f"{repo_id}@{revision} ({endpoint})"
    if CONFIG_NAME not in files and _own_format(files):
        return _download_own_format(hf, repo_id, revision, info, files, endpoint, token, repo_dir, log_fn)
    if CONFIG_NAME not in files:
        raise DataError(f"{where} has no {CONFIG_NAME} (files: {sorted(files)[:12]}); walrus_jax reads the "
                        "architecture and the field vocabulary from it")
    ckpt = _choose_checkpoint(files, where)
    key = _key(ckpt, _content_hash(files[ckpt]), _content_hash(files[CONFIG_NAME]))
    out = os.path.join(repo_dir, key)

    def download() -> tuple[str, str]:
        paths = {}
        for name in (CONFIG_NAME, ckpt):
            log_fn(f"downloading {repo_id}/{name} at {info.sha[:12]}")
            try:
                paths[name] = hf.hf_hub_download(repo_id, name, revision=info.sha, endpoint=endpoint, token=token)
                _remove_orphaned_downloads(paths[name], log_fn)
            except Exception as e:  # noqa: BLE001
                err = _hub_error(e, repo_id, revision, endpoint)
                if err is None and (_is_network_error(e) or isinstance(e, hf.errors.LocalEntryNotFoundError)):
                    err = HubError(f"{where}: downloading {name} failed ({type(e).__name__}); the network went "
                                   "away? Run again: the files already downloaded are kept")
                if err is None:
                    raise
                raise err from e
        return paths[ckpt], paths[CONFIG_NAME]

    _ensure_converted(out, download, log_fn)
    record = {"repo_id": repo_id, "revision": revision, "commit": info.sha, "key": key, "checkpoint": ckpt,
              "endpoint": endpoint}
    for rev in {revision, info.sha}:
        _write_ref(repo_dir, rev, record)
    return out


def _own_format(names) -> bool:
    """True for a repository holding walrus_jax's own format (save_pretrained + push_to_hub)."""
    from walrus_jax.checkpoints import adapters, pretrained

    return pretrained.MARKER in names or (adapters.DELTA_FILE in names and BASE_FILE in names)


def _download_own_format(hf, repo_id, revision, info, files, endpoint, token, repo_dir, log_fn) -> str:
    """Downloads every file of a repository in walrus_jax's own format and returns its snapshot
    folder in huggingface_hub's cache: it loads from there as it is, nothing to convert."""
    from walrus_jax.checkpoints import pretrained

    root = None
    # The completion marker last: a snapshot folder holding it has every other file.
    for name in sorted(files, key=lambda n: n == pretrained.MARKER):
        log_fn(f"downloading {repo_id}/{name} at {info.sha[:12]}")
        try:
            path = hf.hf_hub_download(repo_id, name, revision=info.sha, endpoint=endpoint, token=token)
        except Exception as e:  # noqa: BLE001
            err = _hub_error(e, repo_id, revision, endpoint)
            if err is None:
                raise
            raise err from e
        root = path[: -len(name)].rstrip(os.sep)
    record = {"repo_id": repo_id, "revision": revision, "commit": info.sha, "snapshot": root, "endpoint": endpoint}
    for rev in {revision, info.sha}:
        _write_ref(repo_dir, rev, record)
    return root


def _is_adapter_folder(path: str) -> bool:
    from walrus_jax.checkpoints import adapters

    return os.path.isfile(os.path.join(path, adapters.DELTA_FILE)) and os.path.isfile(os.path.join(path, BASE_FILE))


def describe_source(path: str) -> str:
    """How to name the checkpoint at `path` for someone else: `ORG/NAME@COMMIT` for a conversion or
    a snapshot this module made from the hub, else the absolute path."""
    real = os.path.realpath(path)
    root = os.path.realpath(cache_root())
    repo_dir = os.path.dirname(real)
    if real.startswith(root + os.sep) and os.path.basename(repo_dir) != "local":
        refs = os.path.join(repo_dir, "refs")
        for name in sorted(os.listdir(refs)) if os.path.isdir(refs) else ():
            try:
                with open(os.path.join(refs, name)) as f:
                    record = json.load(f)
            except (OSError, ValueError):
                continue
            if record.get("key") == os.path.basename(real):
                return f"{record['repo_id']}@{record['commit']}"
    return os.path.abspath(path)


# ------------------------------------------------------------------------------ sharing
def save_pretrained(model_or_workdir, directory: str, *, base: str | None = None, vocabulary=None,
                    overwrite: bool = False, info: Mapping[str, Any] | None = None) -> str:
    """Writes walrus_jax's own format into `directory`, which `from_pretrained` (and, after
    `push_to_hub`, anyone by repository id) loads back:

      * a model (walrus_jax.Walrus), or a full fine-tuning workdir (its newest checkpoint): a converted
        checkpoint directory (weights, config.json, vocabulary.json; walrus_jax.checkpoints.pretrained);
      * a LoRA fine-tuning workdir: only its adapter delta (adapters.json + adapters.npz, ~43 MB for
        the 1.3B model at rank 16) and walrus_jax_base.json naming the base it was trained on: `base`,
        default the workdir's init_from (as ORG/NAME@COMMIT when it came from the hub).
    vocabulary, info: as pretrained.save_pretrained (models only). Returns `directory`."""
    from walrus_jax.checkpoints import adapters, pretrained
    from walrus_jax.checkpoints.load import checkpoint_dir, load_model

    if not isinstance(model_or_workdir, (str, os.PathLike)):
        return pretrained.save_pretrained(model_or_workdir, directory, vocabulary=vocabulary, overwrite=overwrite,
                                          info=info)
    workdir = os.fspath(model_or_workdir)
    if checkpoint_dir(workdir) is None:
        raise PathError(f"save_pretrained: {workdir!r} is not a walrus_jax training workdir (no "
                        "checkpoints/<step>/state); pass a model or a workdir")
    try:
        delta = adapters.read_delta(workdir)
    except DataError:
        delta = None  # a full fine-tuning run: the whole model
    if delta is None:
        model = load_model(workdir, dtype="float32")
        return pretrained.save_pretrained(model, directory, vocabulary=model.vocab, overwrite=overwrite,
                                          info={"source": model.source})
    if base is None:
        from walrus_jax.checkpoints.train_state import Checkpointer

        ck = checkpoint_dir(workdir)
        step = int(delta.source.rsplit("/", 1)[-1])
        init_from = (Checkpointer(ck, keep=1_000_000, async_save=False).read_meta(step).get("config") or {}).get("init_from")
        if not init_from:
            raise PathError(f"save_pretrained: {workdir!r} does not record its base checkpoint; pass base=")
        base = describe_source(init_from)
    pretrained.check_output_dir(directory, overwrite)
    tmp = pretrained.partial_dir_for(directory)
    try:
        adapters.write_delta(tmp, delta)
        with open(os.path.join(tmp, BASE_FILE), "w") as f:
            json.dump({"base": base, "base_fingerprint": delta.base, "written_by": "walrus_jax.save_pretrained"}, f,
                      indent=1)
        if os.path.lexists(directory):
            shutil.rmtree(directory)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return os.path.abspath(directory)


def push_to_hub(directory: str, repo_id: str, *, token: str | bool | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None) -> str:
    """Uploads a folder written by `save_pretrained` (a converted checkpoint or an adapter delta with
    its base) to the model repository `repo_id` (created if missing), through huggingface_hub with
    its token (HF_TOKEN / `hf auth login`). Returns the commit's URL. `wj.from_pretrained(repo_id)`
    then loads it (an adapter delta together with the base it names)."""
    from walrus_jax.checkpoints import pretrained

    directory = os.path.abspath(directory)
    if not os.path.isdir(directory) or not _own_format(os.listdir(directory)):
        raise PathError(f"push_to_hub: {directory} is not a folder written by wj.save_pretrained (no "
                        f"{pretrained.MARKER}, or no adapters.json + {BASE_FILE})")
    if os.path.isfile(os.path.join(directory, pretrained.MARKER)):
        pretrained.read_marker(directory)  # refuses an incomplete one
    hf = _hf()
    endpoint = _endpoint(hf)
    api = hf.HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=directory, repo_type="model", revision=revision,
                                 commit_message=commit_message or "walrus_jax checkpoint (wj.push_to_hub)")
    except Exception as e:  # noqa: BLE001
        err = _hub_error(e, repo_id, revision or DEFAULT_REVISION, endpoint)
        if err is None:
            raise
        raise err from e
    return str(getattr(info, "commit_url", info))


# ------------------------------------------------------------------------------ entry points
def resolve(name_or_path: str, *, revision: str | None = None, token: str | bool | None = None,
            what: str = "name_or_path", log_fn: Callable[[str], None] | None = None) -> str:
    """The local directory `walrus_jax.checkpoints.load.load_model` reads for `name_or_path`
    (module docstring), downloading and converting on first use."""
    log_fn = log_fn or log.info
    text = os.path.expanduser(str(name_or_path))
    if not text.startswith("hf://") and os.path.exists(text):
        if revision is not None:
            raise PathError(f"{what}={name_or_path!r} is a local path; revision={revision!r} applies to hub "
                            "repositories only")
        return _resolve_local(text, what, log_fn)
    repo_id, rev = parse_repo(str(name_or_path), revision, what)
    try:
        return _resolve_repo(repo_id, rev, token, log_fn)
    except HubError as e:
        if str(name_or_path).startswith("hf://"):
            raise
        # A bare ORG/NAME may also have been meant as a local path: say that it is not one.
        raise HubError(f"{what}={str(name_or_path)!r} is not a local path; as a hub repository: {e}") from e.__cause__


def from_pretrained(name_or_path: str, *, revision: str | None = None, dtype: str | None = "float32",
                    mesh=None, adapters: str | None = None, token: str | bool | None = None, **overrides):
    """A walrus_jax.Walrus from a hub repository id, an hf:// URL, a converted directory, a training
    workdir or a local folder in the released layout (module docstring). dtype / mesh / adapters /
    overrides: as `walrus_jax.checkpoints.load.load_model` (dtype None: as stored). The model's `vocab`
    is the checkpoint's field vocabulary; `model.cfg.resize_66_to_64` says whether inputs with a last
    axis of 66 are resized.
    Raises HubError / DataError / PathError as one line naming the repository or path."""
    from walrus_jax.checkpoints import pretrained
    from walrus_jax.checkpoints.load import load_model

    path = resolve(name_or_path, revision=revision, token=token)
    if _is_adapter_folder(path):  # adapters only (save_pretrained of a LoRA run): they name their base
        if adapters is not None:
            raise PathError(f"{name_or_path!r} holds adapters already; adapters= applies to a base checkpoint")
        with open(os.path.join(path, BASE_FILE)) as f:
            base = json.load(f)["base"]
        return from_pretrained(base, dtype=dtype, mesh=mesh, adapters=path, token=token, **overrides)
    try:
        return load_model(path, dtype=dtype, mesh=mesh, adapters=adapters, **overrides)
    except pretrained.PretrainedFormatError:
        if not in_cache(path):
            raise
        # A cached conversion whose arrays cannot be read: make it again from the source files.
        log.warning("the cached conversion %s is damaged; converting again", path)
        shutil.rmtree(path, ignore_errors=True)
        path = resolve(name_or_path, revision=revision, token=token)
        return load_model(path, dtype=dtype, mesh=mesh, adapters=adapters, **overrides)
