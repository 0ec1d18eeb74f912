"""The listing of a model folder the aggregator serves to its sites (aggregator/served.py, client/fetch.py).

Hello tells a site the listing as JSON:

    {"digest": "9f0c...",            xxh3-128 over the files' (name, size, digest), in name order: the folder's
                                     identity, the key of the site's cache
     "chunk_bytes": 4194304,         the files stream in chunks of this size (wire/frames.py), resumable at any
                                     multiple of it
     "files": [{"name": "config.json", "size": 612, "xxh3_128": "5c1e..."}, ...]}
                                     each regular file of the folder: its path inside the folder (POSIX, may hold
                                     subfolders), its size, the xxh3-128 of its bytes

A file's digest is over its bytes, not its chunks, so the folder digest does not depend on `chunk_bytes`: the
same model served with another chunk size is the same folder in a site's cache. The site recomputes the folder
digest from the files and refuses a listing whose digest disagrees, and `check_name` refuses, on both sides, any
name that could leave the folder or collide with the site's own files. Everything here raises ProtocolError only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import xxhash

from fl_plugins.errors import ProtocolError

PART = ".part"  # a file a site has not finished fetching: NAME.part, renamed to NAME once whole and verified
MAX_FILES = 10_000
MAX_NAME_BYTES = 1024  # a whole relative path
MAX_COMPONENT_BYTES = 255
MAX_DEPTH = 8


@dataclass(frozen=True)
class FileEntry:
    name: str  # POSIX path inside the folder: "model-00001-of-00002.safetensors", "1_Pooling/config.json"
    size: int
    digest: str  # xxh3-128 of the file's bytes, hex


@dataclass(frozen=True)
class Listing:
    files: tuple[FileEntry, ...]  # in name order
    chunk_bytes: int
    digest: str  # folder_digest(files)

    @classmethod
    def of(cls, files: list[FileEntry], chunk_bytes: int) -> Listing:
        ordered = tuple(sorted(files, key=lambda f: f.name))
        return cls(ordered, chunk_bytes, folder_digest(ordered))

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def to_json(self) -> str:
        files = [{"name": f.name, "size": f.size, "xxh3_128": f.digest} for f in self.files]
        return json.dumps({"digest": self.digest, "chunk_bytes": self.chunk_bytes, "files": files})

    @classmethod
    def from_json(cls, text: str, what: str = "the served model folder's listing") -> Listing:
        """Parse and check a listing: every name (`check_name`), size and digest, and the folder digest."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise ProtocolError(f"{what} is not JSON ({e})") from None
        if not isinstance(data, dict) or not isinstance(data.get("files"), list):
            raise ProtocolError(f"{what} must be an object with a `files` list")
        chunk = data.get("chunk_bytes")
        if type(chunk) is not int or not 0 < chunk <= 64 << 20:
            raise ProtocolError(f"{what}: `chunk_bytes` must be an integer in 1..{64 << 20} (got {chunk!r})")
        if len(data["files"]) > MAX_FILES:
            raise ProtocolError(f"{what} lists {len(data['files'])} files, more than {MAX_FILES}")
        files = [_entry(f, what) for f in data["files"]]
        listing = cls.of(files, chunk)
        names = [f.name for f in listing.files]
        if len(set(names)) != len(names) or not set(names).isdisjoint(_parents(names)):
            raise ProtocolError(f"{what} names a file twice, or a file that is also a folder")
        if data.get("digest") != listing.digest:
            raise ProtocolError(f"{what}: digest {data.get('digest')!r} does not match its files ({listing.digest})")
        return listing


def _entry(f: Any, what: str) -> FileEntry:
    if not isinstance(f, dict):
        raise ProtocolError(f"{what}: a file entry must be an object (got {type(f).__name__})")
    name, size, digest = check_name(f.get("name"), what), f.get("size"), f.get("xxh3_128")
    if type(size) is not int or size < 0:
        raise ProtocolError(f"{what}: file {name!r} has size {size!r}, not an integer >= 0")
    if not isinstance(digest, str) or len(digest) != 32 or any(c not in "0123456789abcdef" for c in digest):
        raise ProtocolError(f"{what}: file {name!r} has digest {digest!r}, not 32 lowercase hex digits")
    return FileEntry(name, size, digest)


def _parents(names: list[str]) -> set[str]:
    return {"/".join(n.split("/")[:k]) for n in names for k in range(1, n.count("/") + 1)}


def check_name(name: Any, what: str = "the served model folder") -> str:
    """`name` if it is a relative POSIX path that stays inside its folder: components not empty, `.` or `..`,
    not hidden (a leading dot), no backslash, colon or control character, at most 255 bytes each and
    MAX_DEPTH deep, and not ending in `.part` (the site's name for a file it has not finished)."""
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"{what}: a file name must be a non-empty string (got {name!r})")
    why = ""
    parts = name.split("/")
    if len(name.encode("utf-8", "replace")) > MAX_NAME_BYTES or len(parts) > MAX_DEPTH:
        why = f"longer than {MAX_NAME_BYTES} bytes or deeper than {MAX_DEPTH} folders"
    elif any(not p or p.startswith(".") for p in parts):
        why = "an absolute path, an empty, `.` or `..` component, or a hidden (dot) file"
    elif any(c in name for c in "\\:") or any(ord(c) < 32 or ord(c) == 127 for c in name):
        why = "a backslash, colon or control character"
    elif any(len(p.encode("utf-8", "replace")) > MAX_COMPONENT_BYTES for p in parts):
        why = f"a component longer than {MAX_COMPONENT_BYTES} bytes"
    elif name.endswith(PART):
        why = f"the suffix {PART} (a site's file it has not finished fetching); rename it"
    if why:
        raise ProtocolError(f"{what}: file name {name!r} is refused: it has {why}")
    return name


def folder_digest(files: tuple[FileEntry, ...] | list[FileEntry]) -> str:
    """xxh3-128 over the files' names, sizes and digests, in name order."""
    h = xxhash.xxh3_128()
    for f in sorted(files, key=lambda f: f.name):
        h.update(json.dumps([f.name, f.size, f.digest]).encode())
        h.update(b"\n")
    return h.hexdigest()
