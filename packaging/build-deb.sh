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

# The default config with the installed layout's absolute paths. Every
# relative path of config/node.yaml must be rewritten: fail if one is left.
sed -e 's|^# biomarker-node default configuration\..*|# biomarker-node configuration (installed by the biomarker-node package).\n# Reference: /usr/share/doc/biomarker-node/CONFIGURATION.md; check with\n#   biomarker-node check-config --config /etc/biomarker-node/node.yaml\n# then `systemctl reload biomarker-node` (routes) or `restart` (the rest).\n# Keep secrets out of this world-readable file: set BIOMARKER_HTTP_TOKEN in a\n# drop-in (systemctl edit biomarker-node) instead of http.token.|' \
    -e 's|^\(  \)# relative to this file.s directory$|\1# the service'"'"'s StateDirectory (systemd creates it for the DynamicUser)|' \
    -e 's|^\(  data_dir:\) \.\./data$|\1 /var/lib/biomarker-node|' \
    -e 's|^\(  \)# made by scripts/install-deps.sh.*$|\1# shipped by the package (ONNX Runtime '"$ORT_VERSION"', CPU)|' \
    -e 's|^\(  library:\) \.\./ort/libonnxruntime\.so$|\1 /usr/lib/biomarker-node/libonnxruntime.so|' \
    -e 's|card: \.\./models/\([a-z0-9_-]*\.yaml\)|card: /usr/share/biomarker-node/models/\1|' \
    config/node.yaml >"$stage/node.yaml"
if grep -n '\.\./' "$stage/node.yaml"; then
    echo "build-deb: config/node.yaml has a relative path the packaged config does not rewrite (above)" >&2
    exit 1
fi
for want in 'data_dir: /var/lib/biomarker-node' 'library: /usr/lib/biomarker-node/libonnxruntime.so' 'card: /usr/share/biomarker-node/models/pma.yaml' '^http:'; do
    grep -q -- "$want" "$stage/node.yaml" || { echo "build-deb: packaged node.yaml lacks $want" >&2; exit 1; }
done

"$bin" config-schema >"$stage/config-schema.json"

# --no-build: the binary above is the one packaged (no second build);
# --strip: the release profile keeps debug info (debug = 1) for backtraces in
# development, the package does not need it.
cargo deb --no-build --strip >"$stage/cargo-deb.out"
deb="$(tail -n 1 "$stage/cargo-deb.out")"
[ -f "$deb" ] || { cat "$stage/cargo-deb.out"; echo "build-deb: no .deb produced" >&2; exit 1; }
echo "build-deb: $(du -h "$deb" | cut -f1) $deb"
echo "$deb"
