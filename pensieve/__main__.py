"""`python -m pensieve serve ...` (also the `pensieve` console script)."""

from __future__ import annotations

import sys


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("serve",):
        print("usage: pensieve serve [--model PATH] [--host H] [--port P] ... (pensieve serve --help)", file=sys.stderr)
        raise SystemExit(2)
    from pensieve.server.cli import main as serve

    serve(argv[1:])


if __name__ == "__main__":
    main()
