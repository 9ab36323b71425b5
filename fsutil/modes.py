"""File modes: give files made by writers that ignore the umask the mode open() would have used."""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """This process's umask, read without changing it (Linux: /proc/self/status)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore (not thread-safe, hence the above first)
    os.umask(mask)
    return mask


def chmod_like_open(path: Path | str) -> None:
    """Give a file the mode open() would have created it with (0666 less the umask); for writers that create
    files 0600 on their own, such as safetensors."""
    os.chmod(path, 0o666 & ~current_umask())
