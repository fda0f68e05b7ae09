"""``python -m synthetic``: see :mod:`synthetic.cli`."""

from synthetic.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
