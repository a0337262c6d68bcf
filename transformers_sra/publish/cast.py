"""Cast a saved safetensors checkpoint's floating-point tensors to another dtype on disk, a slice at a time.

`sra ablate` computes in fp32 where the CPU would emulate the checkpoint's bf16, and saves in bf16. Casting the live
model first would hold the model twice, fp32 and bf16 (1.18 GiB more for the demo model: issue #32). Instead
`hub.save_cleaned` lets transformers write the model as it is, then rewrites each weight file here, reading it with
plain file reads (not mapped, so its pages never count in this process's resident memory) in slices of at most
``chunk_bytes``. The result equals casting the model before saving, bit for bit::

    cast_checkpoint(folder, torch.bfloat16)   # every *.safetensors file, the shard index and config.json
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from ..folders import atomic_file, write_text_atomic

_CODES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}
_FLOATS = {code: dtype for dtype, code in _CODES.items()}
_INDEX = "model.safetensors.index.json"


def cast_file(path: Path, dtype: torch.dtype, chunk_bytes: int = 64 << 20) -> int:
    """Rewrite the safetensors file ``path`` with its floating-point tensors in ``dtype`` (others as they are);
    returns the bytes of tensor data it now holds."""
    with open(path, "rb") as src:
        (length,) = struct.unpack("<Q", src.read(8))
        header = json.loads(src.read(length))
        start = 8 + length
        metadata = header.pop("__metadata__", None)
        names = sorted(header, key=lambda k: header[k]["data_offsets"][0])
        out, offset = {}, 0
        for name in names:
            entry = header[name]
            code = _CODES[dtype] if entry["dtype"] in _FLOATS else entry["dtype"]
            a, b = entry["data_offsets"]
            size = (b - a) // _FLOATS[entry["dtype"]].itemsize * dtype.itemsize if code != entry["dtype"] else b - a
            out[name] = {"dtype": code, "shape": entry["shape"], "data_offsets": [offset, offset + size]}
            offset += size
        if metadata is not None:
            out["__metadata__"] = metadata
        text = json.dumps(out, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
        with atomic_file(path) as tmp, open(tmp, "wb") as dst:
            dst.write(struct.pack("<Q", len(text)) + text)
            for name in names:
                a, b = header[name]["data_offsets"]
                source = _FLOATS.get(header[name]["dtype"])
                cast = out[name]["dtype"] != header[name]["dtype"]
                step = chunk_bytes // source.itemsize * source.itemsize if cast else chunk_bytes
                src.seek(start + a)
                for position in range(a, b, step):
                    raw = bytearray(min(step, b - position))
                    src.readinto(raw)
                    dst.write(torch.frombuffer(raw, dtype=source).to(dtype).view(torch.uint8).numpy() if cast else raw)
    return offset


def cast_checkpoint(folder: str | Path, dtype: torch.dtype, chunk_bytes: int = 64 << 20) -> None:
    """`cast_file` on every ``*.safetensors`` file of ``folder``, then the shard index's total size and
    config.json's ``dtype`` to match."""
    folder = Path(folder)
    if dtype not in _CODES:
        raise ValueError(f"cannot cast a checkpoint to {dtype}: choose one of {', '.join(map(str, _CODES))}")
    sizes = {path.name: cast_file(path, dtype, chunk_bytes) for path in sorted(folder.glob("*.safetensors"))}
    index = folder / _INDEX
    if index.is_file():
        data = json.loads(index.read_text(encoding="utf-8"))
        data.setdefault("metadata", {})["total_size"] = sum(sizes.values())
        write_text_atomic(index, json.dumps(data, indent=2, sort_keys=True) + "\n")
    config = folder / "config.json"
    if config.is_file():
        data = json.loads(config.read_text(encoding="utf-8"))
        for key in {"dtype"} | ({"torch_dtype"} & set(data)):  # transformers 4 named it torch_dtype
            data[key] = str(dtype).replace("torch.", "")
        write_text_atomic(config, json.dumps(data, indent=2, sort_keys=True) + "\n")
