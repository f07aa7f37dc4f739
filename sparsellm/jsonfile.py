"""The toolkit's own JSON files read back (reports, a sweep's settings): a damaged or foreign
one is one line naming it, not the parser's traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparsellm.errors import UserError


def read_json_object(
    path: Path, error: type[UserError] = UserError, hint: str = ""
) -> dict[str, Any]:
    """The JSON object in ``path``; ``error`` (with ``hint`` appended) when the file is not
    UTF-8 JSON or holds something other than an object."""
    suffix = f"; {hint}" if hint else ""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{str(path)!r} is not JSON ({exc}){suffix}") from None
    if not isinstance(value, dict):
        raise error(f"{str(path)!r} does not hold a JSON object{suffix}")
    return value
