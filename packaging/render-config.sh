#!/bin/sh
# Writes the installed-layout config (the .deb's and the images'
# /etc/biomarker-node/node.yaml) from config/node.yaml:
#   node.data_dir        /var/lib/biomarker-node
#   onnxruntime.library  /usr/lib/biomarker-node/libonnxruntime.so
#   models.*.card        /usr/share/biomarker-node/models/<card>.yaml
# Usage: render-config.sh IN OUT [cuda]   (cuda: every model gets
# execution_provider: cuda). Fails if a relative path is left over, so a new
# relative path in config/node.yaml cannot slip into the packages unchanged.
# POSIX sh: it also runs in the Docker build stages.
set -eu
in="$1"
out="$2"
ep="${3:-cpu}"
ort_note="shipped by the package (ONNX Runtime, CPU)"
[ "$ep" = cuda ] && ort_note="shipped in the image (ONNX Runtime GPU, CUDA execution provider)"
sed -e 's|^# biomarker-node default configuration\..*|# biomarker-node configuration, installed layout (rendered from config/node.yaml).\n# Reference: /usr/share/doc/biomarker-node/CONFIGURATION.md. Check with\n#   biomarker-node check-config --config /etc/biomarker-node/node.yaml\n# then reload (routes) or restart (everything else).\n# Keep secrets out of this world-readable file: give BIOMARKER_HTTP_TOKEN in\n# the environment (systemctl edit biomarker-node; docker run -e) instead of http.token.|' \
    -e 's|^\(  \)# relative to this file.s directory$|\1# the service'"'"'s state directory (systemd StateDirectory=; a volume in Docker)|' \
    -e 's|^\(  data_dir:\) \.\./data$|\1 /var/lib/biomarker-node|' \
    -e 's|^\(  \)# made by scripts/install-deps.sh.*$|\1# '"$ort_note"'|' \
    -e 's|^\(  library:\) \.\./ort/libonnxruntime\.so$|\1 /usr/lib/biomarker-node/libonnxruntime.so|' \
    -e 's|card: \.\./models/\([a-z0-9_-]*\.yaml\)|card: /usr/share/biomarker-node/models/\1|' \
    "$in" >"$out"
if [ "$ep" = cuda ]; then
    sed -i 's|{ card: \(/usr/share/biomarker-node/models/[a-z0-9_-]*\.yaml\) }|{ card: \1, execution_provider: cuda }|' "$out"
    grep -q 'execution_provider: cuda' "$out" || { echo "render-config: no model line took execution_provider: cuda" >&2; exit 1; }
fi
if grep -n '\.\./' "$out"; then
    echo "render-config: $in has a relative path that is not rewritten (above)" >&2
    exit 1
fi
for want in 'data_dir: /var/lib/biomarker-node' 'library: /usr/lib/biomarker-node/libonnxruntime.so' 'card: /usr/share/biomarker-node/models/pma.yaml' '^http:'; do
    grep -q -- "$want" "$out" || { echo "render-config: $out lacks $want" >&2; exit 1; }
done
