"""What the benchmark scripts share: the table they print."""


def table(title: str, header: list[str], rows: list[list]) -> None:
    """Prints a left-aligned text table under a title."""
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    print(f"\n{title}")
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    print("  ".join("-" * w for w in widths))
    for row in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(row, widths)))
