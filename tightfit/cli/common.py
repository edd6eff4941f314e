"""Pieces the verbs share: reading a text argument, quieting library progress bars."""

from __future__ import annotations

from pathlib import Path

from ..data import EVALUATION, read_part, sha256_text
from ..errors import TextError


def read_text_arg(path: str | None) -> tuple[str, str, str]:
    """(text, name, sha256) for --text FILE, or the shipped evaluation part by default."""
    if path is None:
        text = read_part(EVALUATION)
        return text, f"tightfit:{EVALUATION.path.name}", EVALUATION.sha256
    p = Path(path)
    if not p.is_file():
        raise TextError(f"--text {path!r}: no such file. Pass a UTF-8 text file, or omit --text for the evaluation part.")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TextError(f"--text {path!r} is not UTF-8 text ({e}). Pass a UTF-8 text file.") from e
    return text, str(p), sha256_text(text)


def quiet_libraries(quiet: bool) -> None:
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
