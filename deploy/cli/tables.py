"""Tables that never cut an identifier: at 80 columns rich would end a profile name or a path with '…'."""
from __future__ import annotations

from typing import Iterable

from rich.table import Table


def id_column(table: Table, header: str, values: Iterable[str], **kwargs) -> None:
    """A column for names, paths and hashes: never wrapped or cut; the other columns wrap around it."""
    width = max([len(header), *(len(str(v)) for v in values)])
    table.add_column(header, no_wrap=True, min_width=width, **kwargs)
