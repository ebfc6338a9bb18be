"""``python -m proactor``: print the io_uring diagnosis.

Always exits 0 (also when io_uring is unavailable): this is a diagnosis, not
a check.  ``--json`` prints the probe result as JSON instead.
"""

from __future__ import annotations

import argparse
import sys

from proactor import _diagnose


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m proactor",
        description="Diagnose io_uring support and which proactor backend will be used.",
    )
    parser.add_argument(
        "--json", action="store_true", help="print the probe result as JSON"
    )
    args = parser.parse_args(argv)
    if args.json:
        print(_diagnose.to_json())
    else:
        print(_diagnose.report())
    return 0


if __name__ == "__main__":
    sys.exit(main())
