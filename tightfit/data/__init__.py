"""The project's fixed text split, shipped as package data.

The calibration part (2010-2015 State of the Union addresses) is the only text any
calibrating feature may read; the evaluation part (2016-2021) is the default for
`tightfit eval` and is never used for calibration.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).parent


@dataclass(frozen=True)
class TextPart:
    name: str
    path: Path
    sha256: str


CALIBRATION = TextPart(
    "calibration",
    _HERE / "sotu-calib-2010-2015.txt",
    "404d4466f3ba195dcc1271358bd432a9344711f705217db442e73f5817f5a3cd",
)
EVALUATION = TextPart(
    "evaluation",
    _HERE / "sotu-eval-2016-2021.txt",
    "31237e8b29fd2e2170fd3b7e7317369cd17d3fa0b3f0598e041d8450f038f015",
)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def read_part(part: TextPart) -> str:
    """Read a shipped text part and check it is the one the project fixed."""
    text = part.path.read_text(encoding="utf-8")
    digest = sha256_text(text)
    if digest != part.sha256:
        raise RuntimeError(
            f"the shipped {part.name} text {part.path} has sha256 {digest}, expected {part.sha256}; "
            "reinstall tightfit"
        )
    return text
