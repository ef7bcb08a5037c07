"""Models named by Hugging Face Hub id (``org/name``, ``gpt2``): resolved to a snapshot directory of the Hub's
own cache with ``huggingface_hub``, so every place that takes a model path takes a Hub id too.

Resolution order of a name: a path that exists on this machine (a directory or a file) always wins; a name that
is spelled as a path (``./x``, ``/x``, ``~/x``, ``a/b/c``, ``x.gguf``) and does not exist is "no such file"; any
other name is a Hub id, at ``revision`` (a branch, tag or commit; ``org/name@rev`` says the same), looked up in
the cache (``HF_HOME``/``HF_HUB_CACHE``) and, unless ``HF_HUB_OFFLINE=1``, checked against and downloaded from the
Hub (``HF_TOKEN`` for gated and private models). Only what loading needs is downloaded: ``*.json``, tokenizer
files and ``*.safetensors`` weights.

Every failure is one line that says what is wrong and how to fix it (:class:`HubError` is a ``FileNotFoundError``
or ``PermissionError``, so the command line reports it as bad input).
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

# What a checkpoint directory needs: config and tokenizer JSON, sentencepiece/BPE/tiktoken vocabularies, the
# chat template, safetensors weights (sharded or not). Not pytorch_model.bin or flax_model.msgpack twins.
DOWNLOADED = ("*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja")
# A Hub repo id: an optional owner, then a name; letters, digits, '-', '_', '.' (huggingface_hub's rule).
_REPO_ID = re.compile(r"(?:[A-Za-z0-9][\w.-]{0,95}/)?[A-Za-z0-9][\w.-]{0,95}")
_COMMIT = re.compile(r"[0-9a-f]{40}")


@dataclasses.dataclass(frozen=True)
class HubSnapshot:
    """A Hub model resolved to a directory of the cache.

    Attributes:
        repo_id: ``org/name``.
        revision: what was asked for (``main`` when nothing was).
        commit: the 40-hex commit the revision pointed to.
        path: the snapshot directory (``.../models--org--name/snapshots/<commit>``).
    """

    repo_id: str
    revision: str
    commit: str
    path: Path

    def record(self) -> dict[str, str]:
        return {"hub_id": self.repo_id, "revision": self.revision, "commit": self.commit, "snapshot": str(self.path)}


def split_revision(name: str, revision: str | None, source: str) -> tuple[str, str | None]:
    """``org/name@rev`` -> ``("org/name", "rev")``; a revision given both ways is refused."""
    base, at, given = name.partition("@")
    if not at:
        return name, revision
    if not given:
        raise ValueError(f"{source} {name}: nothing after '@' (write org/name@<branch, tag or commit>)")
    if revision is not None and revision != given:
        raise ValueError(f"{source} {name}: the revision is given twice ({given!r} after '@' and {revision!r})")
    return base, given


def is_hub_id(name: str | os.PathLike) -> bool:
    """Whether ``name`` would be looked up on the Hub: no local file or directory of that name, and spelled as
    a repo id (with an optional ``@revision``), not as a path."""
    text = os.fspath(name)
    if Path(text).exists():
        return False
    base = text.partition("@")[0]
    return (_REPO_ID.fullmatch(base) is not None and not base.endswith((".gguf", ".yaml", ".yml", ".json"))
            and ".." not in base)


def resolve(name: str, *, revision: str | None = None, source: str = "model") -> HubSnapshot:
    """The cached snapshot of Hub model ``name`` at ``revision`` (downloaded first when online and missing).

    Raises:
        HubError: offline and not cached, the Hub unreachable and not cached, no such repo or revision, a gated
            or private model without a token that may read it; the message says how to fix it.
    """
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub import errors as hub_errors

    repo_id, revision = split_revision(name, revision, source)
    asked = revision or "main"
    shown = f"{source} {repo_id}" + (f" (revision {revision})" if revision else "")
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(DOWNLOADED)))
    except hub_errors.GatedRepoError:
        fix = ("the token in HF_TOKEN cannot read it: accept the model's licence with that account"
               if _token() else "set HF_TOKEN to a token of an account that accepted it (or run `hf auth login`)")
        raise HubPermissionError(f"{shown} is a gated model on the Hugging Face Hub: {fix} at "
                                 f"{constants.ENDPOINT}/{repo_id}") from None
    except hub_errors.RevisionNotFoundError:
        raise HubNotFoundError(f"{shown}: the model has no revision {asked!r} on the Hugging Face Hub (give a "
                               "branch, tag or commit it has)") from None
    except hub_errors.RepositoryNotFoundError:
        private = "" if _token() else ", or set HF_TOKEN if it is private"
        raise HubNotFoundError(f"{shown}: no such local path and no such model on the Hugging Face Hub "
                               f"({constants.ENDPOINT}); check the spelling{private}") from None
    except hub_errors.LocalEntryNotFoundError as error:
        raise HubNotFoundError(_not_cached(shown, repo_id, revision, error, constants)) from None
    except hub_errors.HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", "?")
        raise HubNotFoundError(f"{shown}: the Hugging Face Hub answered HTTP {status} "
                               f"({' '.join(str(error).split())[:200]})") from None
    commit = path.name if _COMMIT.fullmatch(path.name) else asked
    return HubSnapshot(repo_id, asked, commit, path)


def cached(name: str, *, revision: str | None = None) -> HubSnapshot | None:
    """The cache's snapshot of ``name`` at ``revision`` without any network call (None if it is not there):
    what a run records after :func:`resolve` has put it there."""
    from huggingface_hub import errors as hub_errors
    from huggingface_hub import snapshot_download

    repo_id, revision = split_revision(name, revision, "model")
    try:
        path = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(DOWNLOADED),
                                      local_files_only=True))
    except (hub_errors.LocalEntryNotFoundError, hub_errors.HFValidationError, OSError):
        return None
    return HubSnapshot(repo_id, revision or "main", path.name if _COMMIT.fullmatch(path.name) else "", path)


def provenance(path: str | os.PathLike | None, revision: str | None = None) -> dict[str, str]:
    """Where a run's model came from, for its ``run.json``: the Hub id, revision, resolved commit and snapshot
    directory of a Hub model; the absolute path of a local one; the embedded default's file for None."""
    if path is None:
        from jaxalign.models.gguf_io import default_model_path

        return {"embedded": str(default_model_path())}
    if is_hub_id(path):
        snapshot = cached(os.fspath(path), revision=revision)
        if snapshot is not None:
            return snapshot.record()
        return {"hub_id": os.fspath(path), "revision": revision or "main", "commit": "unknown (not in the cache)"}
    return {"path": str(Path(path).resolve())}


def _token() -> str | None:
    from huggingface_hub import get_token

    return get_token()


def _not_cached(shown: str, repo_id: str, revision: str | None, error: Exception, constants) -> str:
    cache = constants.HF_HUB_CACHE
    download = f"hf download {repo_id}" + (f" --revision {revision}" if revision else "")
    if constants.HF_HUB_OFFLINE:
        return (f"{shown}: no such local path, and not in the Hugging Face cache ({cache}) while HF_HUB_OFFLINE=1 "
                f"forbids downloading it: "
                f"run `{download}` where the Hub is reachable (with HF_HOME pointing at this cache), or unset "
                "HF_HUB_OFFLINE")
    return (f"{shown}: no such local path, not in the Hugging Face cache ({cache}), and the Hub ({constants.ENDPOINT}) "
            "could not be "
            f"reached ({type(error.__cause__ or error).__name__}): connect and rerun, or run `{download}` where the "
            "Hub is reachable and point HF_HOME at that cache")


class HubNotFoundError(FileNotFoundError):
    """A Hub model that cannot be had: not cached while offline, no such repo or revision."""


class HubPermissionError(PermissionError):
    """A gated or private Hub model without a token that may read it."""


HubError = (HubNotFoundError, HubPermissionError)
