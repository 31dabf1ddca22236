"""Hugging Face Hub ids as base models: `kifmerge base add NAME org/model` resolves the id with
`huggingface_hub.snapshot_download`, which uses the local cache and honours `HF_HUB_OFFLINE`.

The environment is read at call time (not when huggingface_hub was imported), so
`HF_HUB_OFFLINE`, `HF_HUB_CACHE` and `HF_HOME` set by a caller, a pipeline step or a test
take effect.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from kifmerge.errors import KifError, NotFoundError

HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*\Z")
# what a base model needs: configs, safetensors weights, tokenizer files; never pickles, ONNX, GGUF
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.tiktoken", "tokenizer*"]
TRUE = {"1", "ON", "YES", "TRUE"}


def looks_like_hub_id(text: str) -> bool:
    """`org/name` (what the hub calls a repo id); a path that exists locally is never one."""
    return bool(HUB_ID.match(text)) and not Path(text).exists()


def offline() -> bool:
    from huggingface_hub import constants

    return constants.HF_HUB_OFFLINE or any((os.environ.get(v) or "").upper() in TRUE
                                           for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def cache_dir() -> str:
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    if os.environ.get("HF_HOME"):
        return os.path.join(os.path.expanduser(os.environ["HF_HOME"]), "hub")
    return constants.HF_HUB_CACHE


def resolve(repo_id: str, revision: str | None = None) -> tuple[Path, dict[str, str]]:
    """The local snapshot folder of a hub model (downloaded unless cached or offline) and
    `{"hub_id", "revision"}` (the commit the snapshot is)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" if revision else repo_id
    cache, is_offline = cache_dir(), offline()
    try:
        folder = Path(snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=is_offline,
                                        allow_patterns=ALLOW_PATTERNS))
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if is_offline else "the hub cannot be reached"
        raise NotFoundError(f"{repo_id} is not a local folder, and hub model {where} is not in the Hugging Face cache "
                            f"({cache}) while {why}; download it where the hub is reachable (`hf download {repo_id}`) "
                            "into that cache, or pass a local model folder") from None
    except GatedRepoError:
        raise NotFoundError(f"hub model {repo_id} is gated: accept its terms on the hub and log in (`hf auth login`)") from None
    except RevisionNotFoundError:
        raise NotFoundError(f"hub model {repo_id} has no revision {revision!r}") from None
    except RepositoryNotFoundError:
        raise NotFoundError(f"{repo_id} is neither a local folder nor a hub model (or it is private: `hf auth login`)") from None
    except HfHubHTTPError as exc:
        raise KifError(f"cannot download hub model {where}: {str(exc).splitlines()[0]}") from None
    return folder, {"hub_id": repo_id, "revision": folder.name}
