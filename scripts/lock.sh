#!/usr/bin/env bash
# Refresh the lock files scripts/setup.sh installs from (hashes for every package):
#   requirements/{cpu,cuda}{,-dev}.lock  - CPU torch (PyTorch's CPU index) or PyPI's CUDA torch,
#                                           without/with the [dev] extra (tests, benchmarks).
# Usage: scripts/lock.sh   (needs uv: pip install uv; after changing pyproject.toml's dependencies)
set -euo pipefail
cd "$(dirname "$0")/.."
uv="${UV:-uv}"
torch_version="${TORCH_VERSION:-2.13.0}"
cpu_index="${TORCH_INDEX_URL:-https://download.pytorch.org/whl/cpu}"
common=(pyproject.toml --generate-hashes --python-version 3.11 --python-platform x86_64-manylinux_2_28 --quiet --no-header)
constraint=$(mktemp)
trap 'rm -f "$constraint"' EXIT
echo "torch==${torch_version}+cpu" > "$constraint"
# PyTorch's CPU wheels: from its index (or a local wheel directory: TORCH_FIND_LINKS).
cpu_source=(--extra-index-url "$cpu_index" --index-strategy unsafe-best-match)
[ -n "${TORCH_FIND_LINKS:-}" ] && cpu_source+=(--find-links "$TORCH_FIND_LINKS")
for extra in "" "dev"; do
    suffix=${extra:+-$extra}
    "$uv" pip compile "${common[@]}" ${extra:+--extra "$extra"} "${cpu_source[@]}" -c "$constraint" \
        -o "requirements/cpu${suffix}.lock"
    echo "torch==${torch_version}" > "$constraint.cuda"
    "$uv" pip compile "${common[@]}" ${extra:+--extra "$extra"} -c "$constraint.cuda" -o "requirements/cuda${suffix}.lock"
    rm -f "$constraint.cuda"
done
echo "lock: $(ls requirements/*.lock | tr '\n' ' ')"
