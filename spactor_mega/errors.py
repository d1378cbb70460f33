"""The one base class of errors caused by user input, and the kinds shared across packages.

The command line prints these as a single ``spactor CMD: error: ...`` line (no traceback):
each message names the file or field at fault and what to do about it.
"""


class UserError(ValueError):
    """Bad input: a file, a field or a flag; the message says which and how to fix it.

    ``same_on_every_rank``: the error comes from what every rank of a launch reads alike (the
    config, the shared datasets, a checkpoint's record), so every rank raises it, word for word, and
    the command line prints it once (rank 0's). The others may be one rank's alone: every rank
    prints its own, prefixed with its rank."""

    same_on_every_rank = False


class OutputExistsError(UserError):
    """The output (a dataset, a tokenizer, a converted checkpoint) exists and --force was not given."""
