"""The one exception the data pipeline raises for bad input: a file that is missing, corrupt or made for another
tokenizer, an empty corpus, an impossible blend. The command line prints it as `aoe-ep: data error: ...`."""


class DataError(ValueError):
    """Data that cannot be used; the message names the file (or the `data.` field) and what is wrong with it."""
