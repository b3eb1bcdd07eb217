"""The toolkit's version, at the bottom of the package so every layer (BIDS metadata, provenance) can read it."""

__version__ = "0.2.0"
