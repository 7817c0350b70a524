#!/usr/bin/env python3
"""BIDS-App entrypoint: ``run.py BIDS_DIR OUTPUT_DIR {participant,group} [options]``."""

import sys

from episeg_bids.cli import main

if __name__ == "__main__":
    sys.exit(main())
