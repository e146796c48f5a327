"""Where ``download`` puts an output, checked against what the task recorded."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from imagegen.errors import DownloadError
from imagegen.models import Output

_EXTENSIONS = {
    "image/png": ".png",
    "image/jpeg": ".jpg",
    "image/webp": ".webp",
    "image/gif": ".gif",
    "image/heic": ".heic",
    "image/heif": ".heif",
}


def output_path(directory: Path, task_id: str, output: Output) -> Path:
    """``{directory}/{task id}-{index}.{extension of its type}``."""
    return directory / f"{task_id}-{output.index}{_EXTENSIONS.get(output.mime_type, '.bin')}"


def save_output(directory: Path, task_id: str, output: Output, content: bytes) -> Path:
    """Write ``content`` whole or not at all (a temporary file renamed into place), after checking its
    SHA-256 when the task recorded one."""
    if output.sha256 is not None and hashlib.sha256(content).hexdigest() != output.sha256:
        raise DownloadError(f"task {task_id} output {output.index}: the bytes do not match its sha256")
    directory.mkdir(parents=True, exist_ok=True)
    path = output_path(directory, task_id, output)
    temporary = directory / f".{path.name}.{uuid.uuid4().hex}.part"
    try:
        with temporary.open("xb") as file:  # the umask's permissions, like any file the user saves
            file.write(content)
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path
