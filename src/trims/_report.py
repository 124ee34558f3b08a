"""What ``trims demo`` and ``trims bench`` share: a process's memory, and a plain-text table."""

from __future__ import annotations


def pss_bytes(pid: int) -> int:
    """The proportional set size of process ``pid``: pages it shares with N others count 1/N."""
    with open(f"/proc/{pid}/smaps_rollup") as rollup:
        for line in rollup:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def format_table(header: list[str], rows: list[list[str]]) -> str:
    """Columns aligned, the first to the left and the others to the right."""
    widths = [max(len(row[i]) for row in rows + [header]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) if i == 0 else cell.rjust(width) for i, (cell, width) in enumerate(zip(row, widths)))
        for row in [header, ["-" * width for width in widths], *rows]
    )
