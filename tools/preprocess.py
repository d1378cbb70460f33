#!/usr/bin/env python
"""C4 text -> Megatron indexed dataset for SpacTor pretraining; see --help.

A thin wrapper around :func:`spactor_mega.data.preprocess_cli.main` (also wired as
``spactor preprocess``), runnable from a checkout without installing the package.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spactor_mega.data.preprocess_cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
