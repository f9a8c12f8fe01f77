#!/usr/bin/env bash
# Installs the training/evaluation environment (CPU use; CI calls this).
#
# Tried first (2026-11-27): `pip install --no-deps torch==2.15.0` plus its pure-python deps. It does
# NOT work: PyPI's Linux torch wheel is the CUDA build, and `import torch` fails without the
# nvidia-* / cuda-toolkit wheels (OSError: libcudart.so.13 ... libcublasLt not found), even on CPU.
# So torch is installed normally, with its CUDA wheels (several GB of download, cached by pip).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
"$PY" -m pip install --quiet --disable-pip-version-check -r requirements.txt
"$PY" -c "import torch; torch.set_num_threads(2); print('torch', torch.__version__, (torch.randn(2) @ torch.randn(2)).item())"
"$PY" -c "import onnxruntime, pydicom, onnx, scipy, yaml; print('onnxruntime', onnxruntime.__version__)"
