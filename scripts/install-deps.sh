#!/usr/bin/env bash
# Installs everything the node's build, its tests and the ingest bench need on a
# fresh Debian 12 machine that already has Rust (stable) and python3 + pip.
# Idempotent: safe to run again; apt and pip skip what is already there.
#
# System packages:
#   dcmtk        storescu/echoscu/storescp/dcmdump: the reference peers in tests
#   orthanc      a second real peer for the bench
#   dicom3tools  dciodvfy/dcentvfy: validators for what the node writes
#   cmake        dicom-pixeldata's `charls` feature builds C++ with it; turbojpeg-sys
#                builds libjpeg-turbo (the JPEG Extended .51 decoder) with it
#   sqlite3      to inspect the index by hand
#   openssl      the TLS tests make a throwaway CA and certificates with its CLI
#   time procps curl  bench: /usr/bin/time -v for peak RSS, ps/pgrep, Orthanc's REST API
#   chromium chromium-driver  the status page's browser test (headless, via selenium)
#   dpkg-dev     dpkg-shlibdeps, which cargo-deb runs for the .deb's Depends
#   systemd      systemd-analyze verify/security on the packaged unit (packaging/test-deb.sh)
#   nats-server  NATS with JetStream (`nats-server -js`, Debian 2.9.10): cluster mode's
#                shared store, started by integration-tests/test_cluster.py
#
# Cargo tools: cargo-deb (packaging/build-deb.sh), from crates.io.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/.." && pwd)"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    SUDO="sudo"
fi

export DEBIAN_FRONTEND=noninteractive
APT_PKGS=(dcmtk orthanc orthanc-dicomweb dicom3tools cmake sqlite3 openssl time curl procps chromium chromium-driver dpkg-dev systemd nats-server)

missing=()
for p in "${APT_PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-deps: apt-get install ${missing[*]}"
    # Keep the orthanc package from starting its own service on 4242/8042
    # during installation (policy-rc.d 101 = "action not allowed").
    policy=/usr/sbin/policy-rc.d
    made_policy=0
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' | $SUDO tee "$policy" >/dev/null
        $SUDO chmod +x "$policy"
        made_policy=1
        trap '$SUDO rm -f "$policy"' EXIT
    fi
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends \
        -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
        "${missing[@]}"
    if [ "$made_policy" = 1 ]; then
        $SUDO rm -f "$policy"
    fi
else
    echo "install-deps: apt packages already present"
fi

# The Debian orthanc package ships a service that listens on 4242/8042; tests
# and the bench start their own Orthanc, so make sure the packaged one is off.
if command -v service >/dev/null 2>&1; then
    $SUDO service orthanc stop >/dev/null 2>&1 || true
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now orthanc >/dev/null 2>&1 || true
fi
# Likewise nats-server's packaged service (4222): test_cluster.py starts its own.
if command -v service >/dev/null 2>&1; then
    $SUDO service nats-server stop >/dev/null 2>&1 || true
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now nats-server >/dev/null 2>&1 || true
fi

# Python test dependencies (integration tests, bench helpers, ML runtime).
PY="${PYTHON:-python3}"
PIP_PKGS=(pydicom pynetdicom highdicom numpy pytest requests selenium onnxruntime==1.32.0 nats-py==2.16.0)
echo "install-deps: pip install ${PIP_PKGS[*]}"
"$PY" -m pip install --quiet --disable-pip-version-check --root-user-action=ignore "${PIP_PKGS[@]}" \
    2>&1 | grep -v "^$" || true
# pip's exit status is masked by the filter above; check the imports instead.
"$PY" -c "import pydicom, pynetdicom, highdicom, numpy, pytest, requests, selenium, onnxruntime, nats" \
    || { echo "install-deps: python packages failed to install" >&2; exit 1; }

# The node loads ONNX Runtime at run time (ort's load-dynamic). Its shared
# library comes from the onnxruntime wheel; link it where config/node.yaml
# looks (onnxruntime.library: ../ort/libonnxruntime.so), so the default
# config runs without ORT_DYLIB_PATH.
ort_lib="$("$PY" -c "import onnxruntime, os, glob; d = os.path.join(os.path.dirname(onnxruntime.__file__), 'capi'); print(sorted(glob.glob(os.path.join(d, 'libonnxruntime.so.*')))[-1])")"
mkdir -p "$root/ort"
ln -sf "$ort_lib" "$root/ort/libonnxruntime.so"
echo "install-deps: ONNX Runtime at $root/ort/libonnxruntime.so -> $ort_lib"

# cargo-deb builds the Debian package (packaging/build-deb.sh, run by
# packaging/test-deb.sh). A pinned version from crates.io, about two minutes
# of compiling once; skipped when that version is already installed.
CARGO_DEB_VERSION=3.8.0
if cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    echo "install-deps: cargo-deb $CARGO_DEB_VERSION already present"
else
    echo "install-deps: cargo install cargo-deb --version $CARGO_DEB_VERSION --locked"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi

# The ML engineer's training stack (torch etc.), when it exists.
if [ -f "$root/models/training/install.sh" ]; then
    echo "install-deps: models/training/install.sh"
    bash "$root/models/training/install.sh"
fi

echo "install-deps: done"
