"""The exceptions the toolkit raises on purpose, one module so every layer can name them.

Each carries a message meant for the user as it is (it names the file and the cause); the command
line prints it as one ``[ERR]`` line, the Python API lets it propagate. :class:`SynthSegError` is
the common base, so an embedding program can catch every expected failure with one clause and
still see programming errors as what they are.
"""

from __future__ import annotations

import signal


class SynthSegError(Exception):
    """Base of every error whose message is written for the user."""


class UsageError(SynthSegError):
    """Inconsistent options or paths, detected before any work is done (command line: exit 2)."""


class SizeError(UsageError, ValueError):
    """A memory size (``--max-memory``) that is not a size."""


class InputError(SynthSegError):
    """A problem with one input image; the message names the file and the cause."""


class OutputError(SynthSegError, OSError):
    """An output could not be written; the message names the output and the cause (errno kept)."""

    def __str__(self) -> str:  # the message alone, without OSError's "[Errno N]" prefix
        return str(self.strerror)


class WeightsError(SynthSegError):
    """Weights missing, unreadable, or not matching the network."""


class MemoryShortage(SynthSegError):
    """The estimated need of one image exceeds the memory available even in tiles; the message says what to do."""


class DeviceError(SynthSegError):
    """A GPU that computes wrong values (its self-check against the CPU failed); the message names the device, the OS
    and framework versions, the size of the difference and the ways out."""


class LockedError(SynthSegError):
    """Another run holds the lock on an output; the message names the output and the holder."""


class ProvenanceError(SynthSegError):
    """The engine arguments are not a single-image run the provenance cache can vouch for."""


class UpstreamError(SynthSegError):
    """A problem with the upstream reference engine: bad checkout, bad flags, upstream crash."""


class Cancelled(SynthSegError):
    """Work on a scan was dropped because the batch was interrupted (its staged outputs are already removed);
    raised in a batch's worker threads, which never see the signal itself."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP, turned into an exception so that temporaries and locks are cleaned up as for
    Ctrl-C (a KeyboardInterrupt subclass, so a per-image ``except Exception`` does not swallow it)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
