#!/usr/bin/env bash
# Builds the biomarker-node .deb with cargo-deb (packaging/README.md).
#
#   bash packaging/build-deb.sh            # cargo build --release, then package
#   bash packaging/build-deb.sh --no-build # package the binary already built
#
# Stages in packaging/deb/build/ (git-ignored) what Cargo.toml's
# [package.metadata.deb] assets take from there:
#   libonnxruntime.so    ONNX Runtime from the onnxruntime==1.32.0 pip wheel
#                        (ORT_LIB=/path/to/libonnxruntime.so.X overrides)
#   node.yaml            config/node.yaml with the installed layout's paths
#   config-schema.json   `biomarker-node config-schema`
# Prints the path of the .deb as its last line.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
PY="${PYTHON:-python3}"
ORT_VERSION=1.32.0

build=1
for a in "$@"; do
    case "$a" in
        --no-build) build=0 ;;
        *) echo "build-deb: unknown argument $a" >&2; exit 2 ;;
    esac
done

command -v cargo-deb >/dev/null 2>&1 || {
    echo "build-deb: cargo-deb is missing: cargo install cargo-deb --locked (scripts/install-deps.sh does)" >&2
    exit 1
}

# The real target dir (CARGO_TARGET_DIR, .cargo/config): cargo-deb maps the
# `target/release/` asset prefix to it the same way.
target_dir="$(cargo metadata --format-version 1 --no-deps | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')"
bin="$target_dir/release/biomarker-node"

if [ "$build" = 1 ]; then
    cargo build --release
fi
[ -x "$bin" ] || { echo "build-deb: $bin is missing; run cargo build --release" >&2; exit 1; }

stage="$root/packaging/deb/build"
rm -rf "$stage"
mkdir -p "$stage"

# ONNX Runtime: the CPU library of the pip wheel (scripts/install-deps.sh
# installs onnxruntime==1.32.0). The node dlopen()s it by path, so the file
# name need not match its SONAME.
if [ -n "${ORT_LIB:-}" ]; then
    ort_lib="$ORT_LIB"
else
    ort_dir="$("$PY" -c 'import onnxruntime, os; print(os.path.join(os.path.dirname(onnxruntime.__file__), "capi"))')" || {
        echo "build-deb: python onnxruntime==$ORT_VERSION is not installed (pip install onnxruntime==$ORT_VERSION)" >&2
        exit 1
    }
    ort_lib="$ort_dir/libonnxruntime.so.$ORT_VERSION"
fi
[ -f "$ort_lib" ] || { echo "build-deb: $ort_lib not found (need onnxruntime==$ORT_VERSION)" >&2; exit 1; }
cp -L "$ort_lib" "$stage/libonnxruntime.so"
echo "build-deb: ONNX Runtime from $ort_lib"

# The default config with the installed layout's absolute paths.
sh packaging/render-config.sh config/node.yaml "$stage/node.yaml"

"$bin" config-schema >"$stage/config-schema.json"

# --no-build: the binary above is the one packaged (no second build);
# --strip: the release profile keeps debug info (debug = 1) for backtraces in
# development, the package does not need it.
cargo deb --no-build --strip >"$stage/cargo-deb.out"
deb="$(tail -n 1 "$stage/cargo-deb.out")"
[ -f "$deb" ] || { cat "$stage/cargo-deb.out"; echo "build-deb: no .deb produced" >&2; exit 1; }
echo "build-deb: $(du -h "$deb" | cut -f1) $deb"
echo "$deb"
