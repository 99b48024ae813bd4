"""Reading members of zip archives addressed as ``<archive>.zip@/<member>`` (the Swin codebase's
zip-mode paths). Archive handles are opened lazily, one per process (DataLoader workers each get their
own after fork)."""
from __future__ import annotations

import os
import zipfile
from typing import Dict, Tuple

_SEP = '.zip@'


def is_zip_path(path: str) -> bool:
    return isinstance(path, str) and _SEP in path


def split_zip_path(path: str) -> Tuple[str, str]:
    """'a/train.zip@/n01/x.JPEG' -> ('a/train.zip', 'n01/x.JPEG')."""
    pos = path.index(_SEP) + len('.zip')
    return path[:pos], path[pos + 1:].strip('/')


class ZipReader:
    """Per-process cache of open archives; ``read(path)`` returns the member's bytes."""
    _open: Dict[Tuple[int, str], zipfile.ZipFile] = {}

    @classmethod
    def archive(cls, zip_path: str) -> zipfile.ZipFile:
        key = (os.getpid(), zip_path)
        if key not in cls._open:
            cls._open[key] = zipfile.ZipFile(zip_path, 'r')
        return cls._open[key]

    @classmethod
    def read(cls, path: str) -> bytes:
        zip_path, member = split_zip_path(path)
        return cls.archive(zip_path).read(member)
