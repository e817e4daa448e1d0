"""The one error of model conversion: a setting, file or directory that cannot be converted faithfully."""


class ConversionError(ValueError):
    """Bad input to `aoe-ep export` / `aoe-ep import`; the message is one line and names what is wrong."""
