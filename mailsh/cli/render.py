"""Printing the ``mailsh status`` report (:mod:`mailsh.status`) for a person, with rich.

:mod:`mailsh.status` builds the sections as plain data; this is the one place they are
laid out on a terminal: a heading each, then ``label  value`` lines or a table.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from mailsh.status import Section, human_time
from mailsh.text import printable

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text


def _cell(value: object) -> Text:
    """A table cell: never markup, never a control character (text may come from mail)."""
    from rich.text import Text

    if value is None:
        return Text("-")
    text = str(value)
    if len(text) >= 20 and text[:4].isdigit() and "T" in text[:11]:
        text = human_time(text)
    return Text(printable(text))


def render(console: Console, sections: list[Section]) -> None:
    """Print ``sections`` for a person: a heading each, then rows or a table."""
    from rich.padding import Padding
    from rich.table import Table

    for index, section in enumerate(sections):
        if index:
            console.print()
        console.print(section.title, style="bold", markup=False, highlight=False)
        if section.rows is not None:
            grid = Table.grid(padding=(0, 2))
            grid.add_column(style="dim", no_wrap=True)
            grid.add_column(overflow="fold")
            for label, value in section.rows:
                grid.add_row(label, _cell(value))
            console.print(Padding(grid, (0, 0, 0, 2), expand=False))
        elif not section.data:
            console.print(f"  {section.empty}", markup=False, highlight=False)
        else:
            table = Table(box=None, padding=(0, 2, 0, 0), pad_edge=False, show_edge=False)
            for key, heading in section.columns:
                table.add_column(
                    heading, overflow="fold", no_wrap=key not in section.wrap, header_style="dim"
                )
            for item in section.data:
                table.add_row(*(_cell(item.get(key)) for key, _ in section.columns))
            console.print(Padding(table, (0, 0, 0, 2), expand=False))
        if section.note:
            console.print(f"  {section.note}", style="dim", markup=False, highlight=False)
