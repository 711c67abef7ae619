"""Adapters on the Hugging Face Hub: ``org/name``, ``org/name@revision``, ``org/name/subfolder``.

An id is resolved through huggingface_hub's cache: downloaded when online, taken from the
cache with ``HF_HUB_OFFLINE=1``. Only the files a merge reads are fetched (config, weights,
shards and their index, LLaVA's non_lora_trainables.bin and config.json), never the rest
of a repository. The merge record keeps the id, the resolved commit and the subfolder.

A string names a Hub adapter only when it is not an existing path and has the shape
``org/name[/subfolder...][@revision]`` (the Hub's own id rules); anything else stays a
local folder, so a typo in a local path is reported as a missing folder.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any

from ..errors import AdapterError
from .names import BIN_NAME, CONFIG_NAME, INDEX_NAME, NON_LORA_NAME, SAFETENSORS_NAME

# The files of an adapter folder that merging reads (patterns relative to the subfolder).
MERGE_FILES = (
    CONFIG_NAME, SAFETENSORS_NAME, INDEX_NAME, "adapter_model-*.safetensors", BIN_NAME, NON_LORA_NAME, "config.json",
)  # fmt: skip

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_HUB_ID = re.compile(rf"^(?P<repo>{_PART}/{_PART})(?P<sub>(?:/{_PART})*)(?:@(?P<rev>[^\s@]+))?$")


@dataclass(frozen=True)
class HubRef:
    repo_id: str
    revision: str | None
    subfolder: str | None

    def __str__(self) -> str:
        text = self.repo_id + (f"/{self.subfolder}" if self.subfolder else "")
        return text + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class HubAdapter:
    ref: HubRef
    commit: str  # the revision resolved to a commit hash
    folder: str  # the adapter folder inside the local cache snapshot


def parse_hub_id(text: str) -> HubRef | None:
    """The Hub reference a string denotes, or None when it is a local path (existing, or
    not shaped like an id: absolute, ``./x``, ``~``, backslashes, more than one ``@``)."""
    if os.path.exists(text) or text.startswith((".", "/", "~")) or "\\" in text:
        return None
    m = _HUB_ID.match(text)
    if m is None or ".." in text:
        return None
    sub = m.group("sub").lstrip("/") or None
    return HubRef(m.group("repo"), m.group("rev"), sub)


def resolve(ref: HubRef, label: str) -> HubAdapter:
    """Download (or find in the cache) the files a merge reads; errors name the id."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers/peft
        raise AdapterError(f"Hub id {str(ref)!r} needs huggingface_hub ({exc})", label) from exc
    prefix = f"{ref.subfolder}/" if ref.subfolder else ""
    patterns = [prefix + name for name in MERGE_FILES]
    try:  # huggingface_hub shows its own progress bars while it downloads
        snapshot = snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns)
    except RevisionNotFoundError as exc:
        raise AdapterError(f"Hub repository {ref.repo_id!r} has no revision {ref.revision!r}", label) from exc
    except GatedRepoError as exc:
        raise AdapterError(f"Hub repository {ref.repo_id!r} is gated: log in with access to it", label) from exc
    except RepositoryNotFoundError as exc:
        raise AdapterError(f"no Hub repository {ref.repo_id!r} (or it is private)", label) from exc
    except LocalEntryNotFoundError as exc:
        raise AdapterError(
            f"Hub adapter {str(ref)!r} is not in the local cache and the Hub cannot be reached "
            "(HF_HUB_OFFLINE=1 or no network); download it once online",
            label,
        ) from exc
    except HFValidationError as exc:
        raise AdapterError(f"{str(ref)!r} is not a valid Hub id ({exc})", label) from exc
    except OSError as exc:  # network errors, disk full in the cache
        raise AdapterError(f"cannot fetch Hub adapter {str(ref)!r}: {exc}", label) from exc
    folder = os.path.join(snapshot, ref.subfolder) if ref.subfolder else snapshot
    if not os.path.isfile(os.path.join(folder, CONFIG_NAME)):
        where = f"subfolder {ref.subfolder!r} of " if ref.subfolder else ""
        raise AdapterError(f"{where}Hub repository {ref.repo_id!r} has no {CONFIG_NAME}; not a PEFT adapter", label)
    return HubAdapter(ref, os.path.basename(os.path.normpath(snapshot)), folder)


# ------------------------------------------------------------------------ uploading

CARD_NAME = "README.md"


def model_card(repo_id: str, record: dict[str, Any]) -> str:
    """A model card for a merged adapter: what went in, how it was merged, with what."""
    lines = [
        "---",
        "library_name: peft",
        "tags: [lora, merged, robustmerge_kernels]",
        "---",
        "",
        f"# {repo_id}",
        "",
        f"A LoRA adapter merged from {len(record['inputs'])} adapters with `{record.get('method')}` by "
        f"robustmerge_kernels {record.get('version')} (backend `{record.get('backend')}`).",
        "",
        "## Inputs",
        "",
        "| # | adapter | Hub id | commit |",
        "|---|---|---|---|",
    ]
    for i, entry in enumerate(record["inputs"]):
        hub_entry = entry.get("hub") or {}
        repo = hub_entry.get("repo_id", "")
        if hub_entry.get("subfolder"):
            repo += f"/{hub_entry['subfolder']}"
        lines.append(f"| {i} | {entry['label']} | {repo} | {hub_entry.get('commit', '')} |")
    lines += ["", "## Method and options", "", f"- method: `{record.get('method')}`"]
    lines += [f"- {k}: `{v}`" for k, v in sorted((record.get("hyperparameters") or {}).items())]
    lines += ["", "Every input's files and sha256 are in `robustmerge.json`.", ""]
    return "\n".join(lines)


def _upload(folder: str, repo_id: str) -> None:
    """The Hub calls (replaced by a local double in tests)."""
    from huggingface_hub import create_repo, upload_folder

    create_repo(repo_id, exist_ok=True)
    upload_folder(repo_id=repo_id, folder_path=folder, commit_message="Upload adapter merged with robustmerge_kernels")


def push(folder: str, repo_id: str, record: dict[str, Any]) -> None:
    """Upload a written adapter folder (its model card included) to ``repo_id``."""
    try:
        _upload(folder, repo_id)
    except Exception as exc:  # the folder is written either way: say so
        raise AdapterError(
            f"merged adapter written to {folder!r}, but uploading it to {repo_id!r} failed: {exc}"
        ) from exc
