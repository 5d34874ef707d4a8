"""matplotlib for files, not windows: the Agg backend (no display on servers and in CI). matplotlib comes with the
`train` extra; without it, reports are written without their plots and say so."""

import sys


def pyplot(what_is_skipped: str):
    """matplotlib.pyplot on the Agg backend, or None (with a note on stderr naming `what_is_skipped`)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib not installed (pip install -e '.[train]'): {what_is_skipped}", file=sys.stderr)
        return None
    return plt
