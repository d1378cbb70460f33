"""Known-benign library warnings, filtered so that a run prints our lines, not theirs.

Each entry is a message that says nothing a user of this project can act on: the optional GPU
accelerators (Transformer Engine, Apex) missing on a CPU machine, Megatron's own deprecated
default, and torch deprecations inside DeepSpeed and dist-checkpointing. Anything else still
shows.
"""

from __future__ import annotations

import warnings

KNOWN_BENIGN = (
    (UserWarning, r"Transformer Engine and Apex are not installed"),
    (UserWarning, r"Apex is not installed"),
    (UserWarning, r"full scope is deprecated"),  # Megatron's TransformerConfig default cuda_graph_scope
    (FutureWarning, r"`torch\.distributed\.\w+` is deprecated"),  # DeepSpeed's collectives
    (FutureWarning, r"Please use DTensor instead and we are deprecating ShardedTensor"),  # dist-checkpointing
    (FutureWarning, r"`load_state_dict` is deprecated"),  # dist-checkpointing's torch strategy loading a checkpoint
)


def filter_known_warnings() -> None:
    """Installs the filters (idempotent); the ``spactor`` command calls it first thing."""
    for category, message in KNOWN_BENIGN:
        warnings.filterwarnings("ignore", message=message, category=category)
