"""A Hugging Face Hub cache directory written the way ``huggingface_hub`` writes one, for tests that resolve
models by Hub id with the Hub offline:

    <HF_HOME>/hub/models--org--name/blobs/<sha256>             file contents
    <HF_HOME>/hub/models--org--name/snapshots/<commit>/<file>  relative symlinks to ../../blobs/<sha256>
    <HF_HOME>/hub/models--org--name/refs/<branch or tag>       the commit it points to (no newline)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_snapshot(hf_home: Path, repo_id: str, checkpoint: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put the files of ``checkpoint`` (a directory) into the cache under ``hf_home`` as ``repo_id`` at
    ``commit`` (40 hex digits), with ``refs`` pointing at it. Returns the snapshot directory."""
    assert len(commit) == 40 and all(c in "0123456789abcdef" for c in commit), commit
    repo = Path(hf_home) / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    for source in sorted(Path(checkpoint).rglob("*")):
        if not source.is_file():
            continue
        content = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(content).hexdigest()
        blob.write_bytes(content)
        target = snapshot / source.relative_to(checkpoint)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(os.path.relpath(blob, target.parent))
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot
