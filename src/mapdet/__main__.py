"""``python -m mapdet``: the same as the ``mapdet`` command."""

from mapdet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
