"""Model-card copies for tests.

`without_guard` is a site card as written before the out-of-distribution guard existed: the shipped card minus
`validated_input:` and `validated_output:`. The node applies no guard checks for such a card (docs/ROUTING.md,
"Input guard"), so tests about decoding or reports can measure images the shipped models were not validated on.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from nodeharness import REPO_ROOT


def without_guard(name: str, directory: Path) -> Path:
    card = yaml.safe_load((REPO_ROOT / "models" / f"{name}.yaml").read_text())
    card.pop("validated_input", None)
    card.pop("validated_output", None)
    card["onnx"] = str(REPO_ROOT / "models" / card["onnx"])
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{name}-site.yaml"
    path.write_text(yaml.safe_dump(card, sort_keys=False))
    return path
