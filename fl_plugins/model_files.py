"""Is an initial model readable? The check config.py runs on `initial_model` when the aggregator is configured,
so that a wrong path or file fails before anything starts, with a message that names where the value came from
(`--initial-model`, or the recipe's `initial_model`) and what is wrong with it:

    missing            "... does not exist"
    not safetensors    "... is not a safetensors file (why)"          (a pickle, a truncated file, a bad header)
    a folder           "... holds no safetensors weights (it has ...)" without model.safetensors or an index

Only the headers are read (and each file's size compared with what its header lists); the aggregator reads the
tensors when it imports the model into round 0 (aggregator/store.py `import_initial`). Torch-free.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from fl_plugins.errors import ConfigError, ProtocolError
from fl_plugins.wire.layout import MAX_HEADER_BYTES, parse_header

INDEX = "model.safetensors.index.json"
_GIVE = "give a .safetensors file or a Hugging Face model folder"
_SHOWN = 8  # a folder's entries named in the message


def model_files(path: str | Path, where: str) -> list[Path]:
    """The safetensors files of the model at `path` (one .safetensors file, or a folder with model.safetensors or
    a sharded checkpoint's index), each checked; ConfigError starting with `where` ("--initial-model",
    "recipes/x.yaml: `initial_model`") otherwise."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{where}: {path} does not exist (expected a .safetensors file or a model folder)")
    if path.is_dir():
        files = _folder_files(path, where)
    else:
        files = [path]
    for f in files:
        why = not_safetensors(f)
        if why is not None:
            raise ConfigError(f"{where}: {f} is not a safetensors file ({why}); {_GIVE}")
        if f.suffix != ".safetensors":
            raise ConfigError(f"{where}: {f} holds safetensors but its name does not end in .safetensors; rename it")
    return files


def _folder_files(folder: Path, where: str) -> list[Path]:
    index = folder / INDEX
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = list(dict.fromkeys(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{where}: {index} is not a safetensors index ({e!r}); {_GIVE}") from None
        files = [folder / str(n) for n in names]
        for f in files:
            if not f.is_file():
                raise ConfigError(f"{where}: {f}, listed in {index.name}, does not exist")
        return files
    if (folder / "model.safetensors").is_file():
        return [folder / "model.safetensors"]
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    has = ", ".join(entries[:_SHOWN]) + (f" and {len(entries) - _SHOWN} more" if len(entries) > _SHOWN else "")
    raise ConfigError(
        f"{where}: {folder} holds no safetensors weights (a folder without model.safetensors or {INDEX}; "
        f"{'it has ' + has if entries else 'it is empty'}): save the model there with `save_pretrained` "
        "(safetensors by default), or give a .safetensors file"
    )


def not_safetensors(path: Path) -> str | None:
    """Why the file at `path` is not a safetensors file (header or size), or None when it is one."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            prefix = f.read(8)
            n = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else 0
            head = f.read(n) if 0 < n <= min(MAX_HEADER_BYTES, size - 8) else b""
    except OSError as e:
        return f"cannot be read: {e.strerror or e}"
    why = _header_problem(path, prefix, n, head, size)
    if why is not None and prefix[:4] == b"PK\x03\x04":
        return "a zip archive, as torch.save writes: load it and write it with safetensors' save_file"
    return why


def _header_problem(path: Path, prefix: bytes, n: int, head: bytes, size: int) -> str | None:
    if len(prefix) < 8:
        return f"{size} bytes, too short for a header"
    if len(head) != n or n == 0:
        return f"its first 8 bytes give a header of {n} bytes; the file has {size}"
    try:
        tensors = parse_header(prefix + head, path.name)
    except ProtocolError as e:
        return str(e).removeprefix(f"{path.name}: ")
    data = max((t.end for t in tensors), default=0)
    if 8 + n + data != size:
        return f"truncated or padded: its header lists {data} bytes of tensors, the file holds {size - 8 - n}"
    return None
