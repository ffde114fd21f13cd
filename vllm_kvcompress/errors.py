"""The plugin's configuration error, at the bottom of the import graph so every layer can raise it."""


class KVCompressConfigError(ValueError):
    """A bad ``kvcompress`` setting; the message names the key and what is allowed."""
