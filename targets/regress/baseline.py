"""The baseline file: a `deploy bench --json` measurement kept in the repository. Read it with one-line errors that
say what to do; write it atomically, indented and with sorted keys, so a baseline update is a readable diff.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deploy.core.errors import UserInputError

UPDATE_HINT = "run `deploy regress MODEL --baseline {path} --update` to (re)create it"


def read_baseline(path: str | Path) -> Any:
    """The stored Measurement; a missing, unreadable or foreign file is a UserInputError naming the fix."""
    from deploy.targets.measure.loop import Measurement

    path = Path(path)
    hint = UPDATE_HINT.format(path=path)
    if not path.exists():
        raise UserInputError(f"baseline file {path} does not exist", hint)
    if not path.is_file():
        raise UserInputError(f"baseline {path} is not a file", hint)
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise UserInputError(f"cannot read baseline file {path} ({type(exc).__name__})", hint) from None
    except json.JSONDecodeError as exc:
        raise UserInputError(f"baseline file {path} is not valid JSON (line {exc.lineno}: {exc.msg})", hint) from None
    try:
        return Measurement.from_dict(data)
    except UserInputError as exc:
        raise UserInputError(f"baseline file {path}: {exc.message.rstrip('.')}", hint) from None


def baseline_text(measurement: Any) -> str:
    """The file's exact text: indent 2, sorted keys, one trailing newline."""
    return json.dumps(measurement.to_dict(), indent=2, sort_keys=True, default=str) + "\n"


def write_baseline(path: str | Path, measurement: Any) -> Path:
    """Replace the baseline whole (temporary sibling + rename): a crash never leaves half a file."""
    from deploy.core.atomic_io import atomic_write_text

    return atomic_write_text(path, baseline_text(measurement))
