"""Configuration: one :class:`Options` record for the command line and the API, and its units."""

from .options import GRID_STEP, N_LEVELS, Options, parse_shard, round_up
from .sizes import GB, format_size, parse_size

__all__ = ["GB", "GRID_STEP", "N_LEVELS", "Options", "format_size", "parse_shard", "parse_size", "round_up"]
