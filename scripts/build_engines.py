#!/usr/bin/env python
"""Build deployable engines: a thin wrapper over `kiln build` (same arguments, same API)."""

import sys

from pipeline.cli import main

if __name__ == "__main__":
    sys.exit(main(["build", *sys.argv[1:]]))
