"""Byte sizes and how the plugin prints them (start-up log, errors, the demo)."""

GIB = 1 << 30


def format_bytes(n: int) -> str:
    """Two decimals for GiB and one below, so that sizes that differ print differently."""
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:.2f} {unit}" if unit == "GiB" else f"{n / size:.1f} {unit}"
    return f"{n} B"
