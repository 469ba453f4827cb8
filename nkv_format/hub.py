"""Publishing adapters to, and fetching them from, the Hugging Face Hub.

A repo holds one adapter under the canonical name `adapter.nkv` plus a generated README.md
model card. Readers take `adapter.nkv` when present, otherwise the repo's only `.nkv`
file, and refuse a repo with none or several. Only that file (and README.md on request)
is downloaded; nothing from a repo is ever executed (the format is safetensors: no
pickle, no code).

`huggingface_hub` is imported inside the functions, so `import nkv` never needs it; it
supplies the token, cache, offline mode (HF_HUB_OFFLINE) and endpoint (HF_ENDPOINT).

>>> push_adapter("edits.nkv", "alice/paris-edits")
>>> path = fetch_adapter("alice/paris-edits", revision="v1")
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from .adapter import NKVAdapter
from .errors import NKVError, NKVFormatError, NKVHubError
from .header import read_header
from .model_card import render_model_card

CANONICAL_FILENAME = "adapter.nkv"
CARD_FILENAME = "README.md"
LOGIN_HINT = "run `huggingface-cli login` (or `hf auth login`) or set HF_TOKEN"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_log = logging.getLogger("nkv.hub")


@dataclass(frozen=True)
class PushResult:
    """Where `push_adapter` put the adapter."""

    repo_id: str
    filename: str
    revision: str
    commit_oid: str
    commit_url: str
    pr_url: str | None


@dataclass(frozen=True)
class FetchedAdapter:
    """A downloaded (or cached) adapter file, checked against the Hub's checksum and header rules."""

    repo_id: str
    filename: str
    commit: str | None  # the commit the file came from; None when the cache does not say
    path: Path  # inside the Hugging Face cache; do not edit in place
    offline: bool  # True when served from the cache without asking the Hub

    @property
    def source(self) -> str:
        at = f"@{self.commit[:12]}" if self.commit else ""
        return f"{self.repo_id}/{self.filename}{at}"


# ---------------------------------------------------------------------------- push
def push_adapter(
    adapter_path: str | os.PathLike,
    repo_id: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    base_model: str | None = None,
    card: bool = True,
    token: str | None = None,
) -> PushResult:
    """Validate an .nkv file and publish it, with a model card, in one commit.

    Creates the repo (and the branch `revision`) when missing. The bytes validated are
    the bytes uploaded, so an invalid adapter is never published.

    Args:
        adapter_path: the local .nkv file; uploaded as `adapter.nkv`.
        repo_id: "user/name" or "org/name".
        private: create the repo private (ignored when it exists).
        revision: branch to commit to (default "main").
        commit_message: defaults to a summary of the adapter.
        create_pr: open a pull request instead of committing to the branch.
        base_model: Hub id for the card's `base_model` (default: `nkv.base.name` when it is one).
        card: also write README.md (False keeps the repo's current card).
        token: defaults to HF_TOKEN or the token saved by `huggingface-cli login`.
    Raises:
        NKVFormatError: the file is not a valid adapter (nothing is uploaded).
        NKVHubError: no token, no permission, or the Hub refused the commit.
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    path = Path(adapter_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise NKVError(f"{path}: cannot read ({exc.strerror or exc})") from None
    adapter = NKVAdapter.from_bytes(data, str(path))  # raises NKVFormatError listing every problem
    token = token or _saved_token()
    if not token:
        raise NKVHubError(f"push {repo_id}: no Hugging Face token found; {LOGIN_HINT}")

    ops = [CommitOperationAdd(path_in_repo=CANONICAL_FILENAME, path_or_fileobj=data)]
    if card:
        text = render_model_card(adapter, repo_id, CANONICAL_FILENAME, base_model=base_model)
        ops.append(CommitOperationAdd(path_in_repo=CARD_FILENAME, path_or_fileobj=text.encode("utf-8")))
    message = commit_message or (f"Upload NKV adapter: {adapter.n_facts} facts, layer {adapter.layer}, "
                                 f"base {adapter.base.name}")
    branch = revision or "main"
    api = HfApi(token=token)
    with hub_errors(repo_id, revision, "push to"):
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != "main" and not create_pr:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        info = api.create_commit(repo_id, ops, commit_message=message, revision=revision, create_pr=create_pr)
    return PushResult(repo_id=repo_id, filename=CANONICAL_FILENAME, revision=branch, commit_oid=info.oid,
                      commit_url=info.commit_url, pr_url=info.pr_url)


# ---------------------------------------------------------------------------- fetch
def fetch_adapter(repo_id: str, revision: str | None = None, *, filename: str | None = None,
                  token: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Download a repo's adapter into the Hugging Face cache and return its local path.

    Used by `resolve_adapter`, so `load_nkv_adapter(model, "user/name", revision=...)`
    goes through here. With HF_HUB_OFFLINE=1, or when the Hub cannot be reached, the
    cached copy of `revision` is used.

    Raises:
        NKVHubError: repo/revision/file not found, no single adapter in the repo, gated,
            or not cached while offline (the message says what to do).
        NKVFormatError: the file is damaged (checksum) or breaks the format's header rules.

    >>> fetch_adapter("alice/paris-edits", revision="main")
    PosixPath('.../snapshots/<commit>/adapter.nkv')
    """
    return fetch(repo_id, revision, filename=filename, token=token, cache_dir=cache_dir).path


def fetch(repo_id: str, revision: str | None = None, *, filename: str | None = None,
          token: str | None = None, cache_dir: str | os.PathLike | None = None) -> FetchedAdapter:
    """`fetch_adapter` with the details: which file, which commit, from the cache or not."""
    from huggingface_hub import HfApi, hf_hub_download

    if _offline():
        return _from_cache(repo_id, revision, filename, cache_dir, "HF_HUB_OFFLINE is set")
    with hub_errors(repo_id, revision, "download from"):
        try:
            info = HfApi(token=token).model_info(repo_id, revision=revision)
        except Exception as exc:
            if not is_network_error(exc):
                raise
            _log.warning("%s: the Hub is unreachable (%s); trying the cached copy", repo_id, type(exc).__name__)
            return _from_cache(repo_id, revision, filename, cache_dir, f"the Hub at {_endpoint()} is unreachable")
        names = [s.rfilename for s in (info.siblings or [])]
        if filename is not None and not filename.endswith(".nkv"):
            raise NKVHubError(f"{repo_id}: {filename!r} is not an .nkv file; only adapters are fetched")
        if filename is not None and filename not in names:
            raise NKVHubError(f"{repo_id}{_at(revision)}: no file {filename!r} in the repo "
                              f"(it has: {_listing(names)})")
        name = filename or pick_adapter_file(repo_id, names, revision)
        # The symbolic revision (not info.sha) keeps the cache's refs/<branch> current, which
        # offline mode needs later; both name the same commit unless the branch just moved.
        local = Path(hf_hub_download(repo_id, name, revision=revision, token=token, cache_dir=cache_dir))
    # The commit actually downloaded is the snapshot folder the file landed in.
    snapshot = local.parents[len(Path(name).parts) - 1].name
    commit = snapshot if _COMMIT.match(snapshot) else info.sha
    return _checked(FetchedAdapter(repo_id, name, commit, local, offline=False))


def fetch_model_card(repo_id: str, revision: str | None = None, *, token: str | None = None) -> Path | None:
    """Download the repo's README.md (text only, never executed); None when it has none."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError

    with hub_errors(repo_id, revision, "download from"):
        try:
            return Path(hf_hub_download(repo_id, CARD_FILENAME, revision=revision, token=token))
        except EntryNotFoundError:
            return None


def pick_adapter_file(repo_id: str, names: list[str], revision: str | None = None, where: str = "repo") -> str:
    """`adapter.nkv` when present, else the only `.nkv` file; NKVHubError for none or several."""
    found = sorted(n for n in names if n.endswith(".nkv"))
    if CANONICAL_FILENAME in found:
        return CANONICAL_FILENAME
    if len(found) == 1:
        return found[0]
    at = _at(revision)
    if not found:
        raise NKVHubError(f"{repo_id}{at}: no .nkv adapter file in the {where} (files: {_listing(names)}); "
                          f"is it an NKV adapter repo? Publish one with `nkv push edits.nkv --repo {repo_id}`")
    raise NKVHubError(f"{repo_id}{at}: {len(found)} .nkv files and no {CANONICAL_FILENAME} in the {where} "
                      f"({_listing(found)}); choose one: `nkv pull {repo_id} --file NAME` or "
                      "fetch_adapter(..., filename=NAME), then load that path")


# ---------------------------------------------------------------------------- cache
def _from_cache(repo_id: str, revision: str | None, filename: str | None,
                cache_dir: str | os.PathLike | None, reason: str) -> FetchedAdapter:
    """Find `revision` of the repo in the hub cache (models--org--name/{refs,snapshots}) without network."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    root = Path(cache_dir or constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model")
    rev = revision or "main"
    commit = rev if _COMMIT.match(rev) else None
    ref = root / "refs" / rev
    if commit is None and ref.is_file():
        commit = ref.read_text().strip()
    snapshot = root / "snapshots" / commit if commit else None
    if snapshot is None or not snapshot.is_dir():
        raise NKVHubError(f"{repo_id}@{rev}: not in the local cache ({root}) and {reason}; fetch it once "
                          f"with network access (`nkv pull {repo_id}`)"
                          + (", or unset HF_HUB_OFFLINE" if _offline() else ""))
    names = [p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*.nkv")]
    name = filename or pick_adapter_file(repo_id, names, rev, where="cached snapshot")
    path = snapshot / name
    if not path.is_file():
        raise NKVHubError(f"{repo_id}@{rev}: {name!r} is not in the cached snapshot {snapshot} and {reason}; "
                          f"fetch it once with network access (`nkv pull {repo_id} --file {name}`)")
    return _checked(FetchedAdapter(repo_id, name, commit, path, offline=True))


def _checked(fetched: FetchedAdapter) -> FetchedAdapter:
    """Checksum against the Hub's ETag, then the header rules; a bad file never reaches a model."""
    _verify_checksum(fetched.path, fetched.source)
    try:
        read_header(fetched.path)
    except NKVFormatError as exc:
        hint = (f"the repo's file is not a valid NKV adapter, or the cached copy at {fetched.path} is damaged "
                "(delete it and fetch again)")
        raise type(exc)(fetched.source, [*exc.problems, hint]) from None
    return fetched


def _verify_checksum(path: Path, source: str) -> None:
    """The cache names each blob by the ETag the Hub sent: sha256 for LFS files, git blob
    sha1 for regular ones. huggingface_hub checks only the length, so compare the bytes here."""
    blob = Path(os.path.realpath(path))
    expected = blob.name
    if re.fullmatch(r"[0-9a-f]{64}", expected):
        algo, digest = "sha256", hashlib.sha256()
    elif _COMMIT.match(expected):
        algo, digest = "git-sha1", hashlib.sha1(b"blob %d\0" % blob.stat().st_size)
    else:
        return  # a cache without symlinks holds plain copies: there is no ETag to compare with
    with open(blob, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    got = digest.hexdigest()
    if got != expected:
        # Drop the damaged copy so that running the command again downloads it afresh.
        for p in (path, blob):
            p.unlink(missing_ok=True)
        raise NKVFormatError(source, [f"downloaded bytes do not match the Hub's checksum ({algo} {got[:12]}… "
                                      f"vs expected {expected[:12]}…): corrupted in transit or on disk; the damaged "
                                      "copy was removed from the cache, run the command again"])


# ---------------------------------------------------------------------------- errors
@contextmanager
def hub_errors(repo_id: str, revision: str | None, action: str) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into NKVHubError messages that say what to do.

    `action` completes "your token may not ... this repo": "push to", "download from".
    """
    from huggingface_hub import utils as hf

    at = _at(revision)
    try:
        yield
    except NKVError:
        raise
    except hf.GatedRepoError:
        raise NKVHubError(f"{repo_id}: the repo is gated; accept its access conditions on its Hub page, "
                          f"then log in ({LOGIN_HINT})") from None
    except hf.RepositoryNotFoundError:
        why = "no write access" if action == "push to" else "a private repo your token cannot read"
        raise NKVHubError(f"{repo_id}: repository not found, or not accessible with your token ({why}); "
                          f"check the id and {LOGIN_HINT}") from None
    except hf.RevisionNotFoundError:
        raise NKVHubError(f"{repo_id}: revision {revision!r} not found; pass an existing branch, tag or "
                          "commit") from None
    except hf.LocalEntryNotFoundError:
        raise NKVHubError(f"{repo_id}{at}: not in the local cache and the Hub cannot be used; fetch it once with "
                          f"network access (`nkv pull {repo_id}`), or unset HF_HUB_OFFLINE") from None
    except hf.EntryNotFoundError as exc:
        raise NKVHubError(f"{repo_id}{at}: a requested file is not in the repo ({str(exc).splitlines()[0]}); "
                          "list its files on its Hub page") from None
    except hf.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 401:
            raise NKVHubError(f"{repo_id}: the Hub rejected the token (401); {LOGIN_HINT} with a valid token") from None
        if status == 403:
            raise NKVHubError(f"{repo_id}: permission denied (403): your token may not {action} this repo; use a "
                              "token with write access to its namespace") from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise NKVHubError(f"{repo_id}: Hub request failed while trying to {action} the repo: {first}") from None
    except hf.HFValidationError as exc:
        raise NKVHubError(f"{repo_id!r} is not a valid Hub repo id ({exc}); use 'user/name'") from None
    except Exception as exc:
        if not is_network_error(exc):
            raise
        offline_hint = ", or set HF_HUB_OFFLINE=1 to use cached adapters" if action.startswith("download") else ""
        raise NKVHubError(f"{repo_id}: cannot reach the Hub at {_endpoint()} ({type(exc).__name__}: {exc}); check "
                          f"the network or HF_ENDPOINT{offline_hint}") from None


def is_network_error(exc: BaseException) -> bool:
    """A transport failure (refused, DNS, timeout, offline) of whichever HTTP client the hub uses."""
    if isinstance(exc, (ConnectionError, TimeoutError)):  # includes OfflineModeIsEnabled
        return True
    names = {"TransportError", "TimeoutException", "ConnectionError", "Timeout"}
    return any(c.__name__ in names and c.__module__.split(".")[0] in {"httpx", "httpx2", "requests"}
               for c in type(exc).__mro__)


# ---------------------------------------------------------------------------- helpers
def _saved_token() -> str | None:
    try:
        from huggingface_hub import get_token
    except ImportError:  # older huggingface_hub
        from huggingface_hub.utils import get_token
    return get_token()


def _offline() -> bool:
    from huggingface_hub import constants

    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else constants.HF_HUB_OFFLINE)


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _at(revision: str | None) -> str:
    return f"@{revision}" if revision else ""


def _listing(names: list[str], limit: int = 10) -> str:
    if not names:
        return "none"
    more = f", … {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


__all__ = ["push_adapter", "fetch_adapter", "fetch", "fetch_model_card", "pick_adapter_file", "hub_errors",
           "is_network_error", "PushResult", "FetchedAdapter", "CANONICAL_FILENAME", "CARD_FILENAME"]
