"""The one base class of errors caused by user input, and the kinds shared across packages.

The command line prints these as a single ``spactor CMD: error: ...`` line (no traceback):
each message names the file or field at fault and what to do about it.
"""


class UserError(ValueError):
    """Bad input: a file, a field or a flag; the message says which and how to fix it."""


class OutputExistsError(UserError):
    """The output (a dataset, a tokenizer, a converted checkpoint) exists and --force was not given."""
