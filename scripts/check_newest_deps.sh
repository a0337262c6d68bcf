#!/usr/bin/env bash
# Does the newest transformers (and peft) that setup.cfg allows keep the unit suite green?
#
# transformers-sra reaches into transformers internals (fused expert layouts, config and cache APIs), so setup.cfg
# pins the tested range (transformers>=5.x,<6). This check installs the package with [test] into a throwaway venv,
# upgrades to the newest allowed releases and runs the unit tests (not the real-model suite). It downloads
# packages and takes as long as the unit suite, so it is not part of .ci/run: run it by hand before a release,
# or as a scheduled CI job:
#
#   scripts/check_newest_deps.sh                          # CPU torch from PyTorch's CPU index when reachable
#   TORCH_FROM=.venv/bin/python scripts/check_newest_deps.sh   # reuse that interpreter's torch (no download)
#   KEEP=1 PYTEST_ARGS="-x -k adapter" scripts/check_newest_deps.sh
#
# Exit status: pytest's (0: green). The venv lives in a temp folder and is removed unless KEEP is set.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=$(mktemp -d "${TMPDIR:-/tmp}/sra-newest-deps.XXXXXX")
trap '[ -n "${KEEP:-}" ] && echo "venv kept at $VENV" || rm -rf "$VENV"' EXIT

"$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
if [ -n "${TORCH_FROM:-}" ]; then
  # Link the given interpreter's torch (package and metadata) into the venv: torch is not what this checks.
  SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  "$TORCH_FROM" - "$SITE" <<'PY'
import importlib.metadata as md, os, sys
dist = md.distribution("torch")
root = dist.locate_file("")
names = {str(f).split("/")[0] for f in dist.files or []}
for name in sorted(names):
    src = os.path.join(root, name)
    if name not in ("", "..") and os.path.exists(src) and not name.endswith(".data"):
        os.symlink(src, os.path.join(sys.argv[1], name))
print("torch", dist.version, "linked from", root)
PY
  "$TORCH_FROM" -c "import importlib.metadata as md; print('\n'.join(r for r in md.requires('torch') or [] if 'extra ==' not in r))" > "$VENV/torch-requires.txt"
  "${PIP[@]}" -r "$VENV/torch-requires.txt"
else
  INDEX=()
  if ! command -v nvidia-smi >/dev/null 2>&1 && "$PYTHON" -c "import urllib.request as u; u.urlopen('https://download.pytorch.org/whl/cpu/', timeout=3)" >/dev/null 2>&1; then
    INDEX=(--index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple)
  fi
  "${PIP[@]}" "${INDEX[@]}" torch
fi
"${PIP[@]}" ".[test]"
"${PIP[@]}" -U "transformers<6" "peft<1"
"$VENV/bin/python" -c "import torch, transformers, peft; print('testing with torch', torch.__version__, '· transformers', transformers.__version__, '· peft', peft.__version__)"
# From the source tree (python -m puts it first on sys.path), without touching its .pytest_cache.
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not real_model" ${PYTEST_ARGS:-}
