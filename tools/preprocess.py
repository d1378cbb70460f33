#!/usr/bin/env python
"""C4 text -> Megatron indexed dataset for SpacTor pretraining; see --help.

A thin wrapper around :func:`spactor_mega.data.preprocess.main` (also wired as
``spactor preprocess``), runnable from a checkout without installing the package.
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spactor_mega.data.preprocess import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: with torch loaded it takes over a second, and after an
    # error or Ctrl-C it would also wait for the background Megatron import to finish.
    # Outputs are complete (or removed) and closed by now.
    os._exit(code)
