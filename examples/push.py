"""Push a folder written by ``sra ablate`` / `save_cleaned` to the Hub, all files in one commit.

    python examples/push.py qwen-sra/ me/qwen-sra --dry-run     # offline: check and list what would go up
    python examples/push.py qwen-sra/ me/qwen-sra --private     # the real push (HF_TOKEN or `hf auth login`)

`PreTrainedModel.push_to_hub` would replace the model card and leave out the report and figures, so the
push goes through `HfApi.upload_folder` (`push_cleaned`). The token is never written or printed.
"""

import argparse
from pathlib import Path

from huggingface_hub import ModelCard
from huggingface_hub.utils import validate_repo_id

from transformers_sra.publish.hub import REQUIRED_FILES, push_cleaned

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("folder")
parser.add_argument("repo_id")
parser.add_argument("--private", action="store_true")
parser.add_argument("--dry-run", action="store_true", help="check the folder and list the upload; no network")
args = parser.parse_args()

folder = Path(args.folder)
validate_repo_id(args.repo_id)
missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
if missing:
    raise SystemExit(f"error: {folder} is missing {', '.join(missing)}; write it with sra ablate --output first")
card = ModelCard.load(folder / "README.md")  # parses the YAML header locally; validate() needs the network

if args.dry_run:
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    print(f"would push {len(files)} files ({sum(p.stat().st_size for p in files) / 1e6:.1f} MB) to "
          f"{args.repo_id}{' (private)' if args.private else ''}; card base_model: {card.data.base_model}")
    for path in files:
        print(f"  {path.relative_to(folder)}  {path.stat().st_size:,} bytes")
else:
    print(push_cleaned(folder, args.repo_id, private=args.private))
