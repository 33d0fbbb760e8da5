"""The ``engine`` command line, one module per command group.

Each module exposes ``register(subparsers)``; ``engine/cli.py`` lists them in
order. Commands work over :mod:`engine.runtime` and the domain modules; no
domain module imports argparse or anything in this package.
"""
