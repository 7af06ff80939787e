#!/usr/bin/env bash
# Build the GPU kit's carried folder, .kit/ (git-ignored), here: the Python packages the device machine lacks, for its
# Python 3.12 (Ray slimmed, all in one tar.xz), and the datasets the kit trains on; then print what one device call
# carries with it, which must stay under KIT_BUDGET_MIB (55; the device tool's limit is 64 MiB). docs/gpu.md says how
# the kit is run.
#
#   bash scripts/device/prepare.sh
#
# Downloads are cached (KIT_CACHE, default ~/.cache/restoration-kit); the packages are rebuilt only when a pin or the
# slimming changes. Needs pip, unzip, strip, tar and xz here, and the project's venv (or PYTHON) for the datasets.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
KIT="$REPO/.kit"
CACHE="${KIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/restoration-kit}"
PY="${PYTHON:-$REPO/.venv/bin/python}"
DATASETS="${DATASETS:-$REPO/../shared/datasets}"
BUDGET_MIB="${KIT_BUDGET_MIB:-55}"

# What the device's Python 3.12 lacks for this project: Ray's own requirements and those of its data and train extras,
# less what the device image already holds (the device tool's KINDS.md lists it: click, filelock, msgpack, packaging,
# protobuf, pyyaml, requests, numpy, pandas, pyarrow, fsspec, aiohttp, pillow, torch ... are there), plus isal
# (restoration.codec's fast deflate). Ray's "default" extra (dashboard, metrics exporters) is left out: Ray then
# runs without its dashboard. The versions are those of the project's venv, so the dry run tests the same code.
PACKAGES=(
    ray==2.60.0
    jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 tensorboardX==2.6.5
    isal==1.9.1
)
# Parts of Ray the kit never loads (Java jars, RLlib, Serve, the LLM libraries, the dashboard's web client).
SLIM=(ray/jars ray/rllib ray/serve ray/llm ray/dashboard/client)
SLIM_VERSION=1  # bump when the slimming below changes, so the next run rebuilds

mkdir -p "$KIT" "$CACHE/wheels"

# ---- packages: download (cached), unpack, slim, strip, one tar.xz
echo "prepare: wheels for cp312 manylinux x86_64 into $CACHE/wheels"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CACHE/wheels" "${PACKAGES[@]}"
WHEELS=()
for pin in "${PACKAGES[@]}"; do
    name="${pin%%==*}"; version="${pin##*==}"
    # Wheel file names spell the project name lower-case with '_' for '-'.
    pattern="$(echo "$name" | tr 'A-Z-' 'a-z_')-${version}-*.whl"
    match=$(find "$CACHE/wheels" -maxdepth 1 -iname "$pattern" | sort | tail -1)
    [ -n "$match" ] || { echo "prepare: no wheel for $pin in $CACHE/wheels" >&2; exit 1; }
    WHEELS+=("$match")
done
KEY=$( (printf '%s\n' "SLIM_VERSION=$SLIM_VERSION" "${SLIM[@]}"; sha256sum "${WHEELS[@]}" | cut -d' ' -f1) | sha256sum | cut -c1-16)
if [ -f "$KIT/site.tar.xz" ] && [ "$(cat "$KIT/site.key" 2>/dev/null)" = "$KEY" ]; then
    echo "prepare: .kit/site.tar.xz is up to date ($KEY)"
else
    BUILD=$(mktemp -d)
    trap 'rm -rf "$BUILD"' EXIT
    for wheel in "${WHEELS[@]}"; do unzip -q -o "$wheel" -d "$BUILD/site"; done
    for part in "${SLIM[@]}"; do rm -rf "$BUILD/site/$part"; done
    find "$BUILD/site" -name __pycache__ -type d -prune -exec rm -rf {} +
    find "$BUILD/site" -mindepth 2 -maxdepth 2 -type d -name tests -exec rm -rf {} +  # jsonschema's, referencing's
    # Symbol tables only (the dynamic symbols stay): 158 -> 116 MB, 22.9 -> 19.3 MiB compressed.
    find "$BUILD/site" -name '*.so' -exec strip --strip-unneeded {} +
    strip --strip-unneeded "$BUILD/site/ray/core/src/ray/raylet/raylet" "$BUILD/site/ray/core/src/ray/gcs/gcs_server"
    echo "prepare: $(du -sm "$BUILD/site" | cut -f1) MB unpacked; compressing (xz -9, a few minutes)"
    tar --sort=name --owner=0 --group=0 --numeric-owner --mtime=@0 -C "$BUILD/site" -cf - . \
        | xz -9 -T2 > "$KIT/site.tar.xz.part"
    mv "$KIT/site.tar.xz.part" "$KIT/site.tar.xz"
    echo "$KEY" > "$KIT/site.key"
    rm -rf "$BUILD"
    trap - EXIT
fi

# ---- the working tree that travels with every call: tracked and untracked files git does not ignore
tree_bytes=$(cd "$REPO" && git ls-files -z --cached --others --exclude-standard \
    | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
site_bytes=$(stat -c %s "$KIT/site.tar.xz")

# ---- datasets: Train400 and Set12 as they are, as much of LIVE1 (lossless WebP) as the budget leaves
echo "prepare: datasets from $DATASETS"
rm -rf "$KIT/datasets.part"
budget_bytes=$((BUDGET_MIB * 1048576 - tree_bytes - site_bytes - 65536))  # 64 KiB for the manifest
"$PY" "$REPO/scripts/device/kit.py" --pack "$DATASETS" "$KIT/datasets.part" "$budget_bytes" > "$KIT/datasets.json"
rm -rf "$KIT/datasets"
mv "$KIT/datasets.part" "$KIT/datasets"

# ---- the manifest kit.py copies into kit.json, and the sizes
"$PY" - "$KIT" "$tree_bytes" "$BUDGET_MIB" "$KEY" "${WHEELS[@]}" <<'EOF'
import datetime, hashlib, json, sys
from pathlib import Path

kit, tree_bytes, budget_mib, key, wheels = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5:]
datasets = json.loads((kit / "datasets.json").read_text())
site = kit / "site.tar.xz"
manifest = {
    "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "python": "cp312 manylinux x86_64",
    "packages": [{"wheel": Path(w).name, "sha256": hashlib.sha256(Path(w).read_bytes()).hexdigest()} for w in wheels],
    "site": {"file": site.name, "bytes": site.stat().st_size, "key": key},
    "datasets": datasets,
}
(kit / "MANIFEST.json").write_text(json.dumps(manifest, indent=1) + "\n")
(kit / "datasets.json").unlink()
carried = sum(p.stat().st_size for p in kit.rglob("*") if p.is_file())
mib = lambda n: f"{n / 2**20:6.1f} MiB"
folders = datasets["folders"]
print("prepare: what one device call carries (carry: .kit)")
print(f"  working tree (tracked + untracked, not ignored)  {mib(tree_bytes)}")
print(f"  .kit/site.tar.xz ({len(wheels)} packages, Ray slimmed)      {mib(site.stat().st_size)}")
for name, entry in folders.items():
    print(f"  .kit/datasets/{name:<9} {entry['files']:4d} files                  {mib(entry['bytes'])}")
if datasets["left_out"]:
    print(f"  (LIVE1: {len(datasets['left_out'])} photos left out for the budget: {', '.join(datasets['left_out'])})")
total = tree_bytes + carried
print(f"  total                                            {mib(total)}  (budget {budget_mib} MiB, limit 64 MiB)")
sys.exit(0 if total <= budget_mib * 2**20 else 1)
EOF
