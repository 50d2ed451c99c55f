"""Every error class: the user errors with their exit codes, and those a layer raises for its caller.

Tasks catch `ImagepipeError` in one place (`pipeline.tasks.guard`) and turn it into an
Invoke `Exit` with the message, the hint and the exit code below. The classes at the end
(NumberError, Invalid, NotFound, ...) never reach a user as they are: the caller turns them
into one of the user errors, adding what it knows (the key path, the URL, the file). Anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence


class ImagepipeError(Exception):
    """Base class: a message for the user, an optional fix hint and an exit code."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def render(self) -> str:
        """The text shown to the user: message, then the hint on its own line."""
        return self.message if not self.hint else f"{self.message}\n  hint: {self.hint}"


class ConfigError(ImagepipeError):
    """The configuration is invalid; carries every problem found, not just the first."""

    exit_code = 2

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  {p}" for p in self.problems)
        count = len(self.problems)
        super().__init__(
            f"{source}: {count} problem{'s' if count != 1 else ''} in the configuration:\n{lines}",
            hint="fix the keys above in invoke.yaml (see docs/configuration.md)",
        )


class UsageError(ImagepipeError):
    """A bad argument on the command line (unknown image, conflicting flags...)."""

    exit_code = 2


class ToolMissing(ImagepipeError):
    """A required program is not installed."""

    exit_code = 127


class CommandFailed(ImagepipeError):
    """A subprocess exited non-zero: carries argv, exit code and the tail of its output."""

    exit_code = 1

    def __init__(self, argv: Sequence[str], returncode: int, tail: str, hint: str | None = None):
        self.argv = list(argv)
        self.returncode = returncode
        self.tail = tail
        body = f"command failed (exit {returncode}): {shlex.join(self.argv)}"
        if tail.strip():
            body += "\n" + "\n".join(f"  | {line}" for line in tail.rstrip().splitlines())
        super().__init__(body, hint)


class AccelUnavailable(ImagepipeError):
    """An explicitly requested accelerator cannot be used on this host."""

    exit_code = 3


class HostUnsuitable(ImagepipeError):
    """This host cannot build or run the requested image (wrong arch, OS, missing feature)."""

    exit_code = 3


class BuildFailed(ImagepipeError):
    """A build step failed; the last good image is untouched."""

    exit_code = 1


class MirrorUnavailable(ImagepipeError):
    """A package mirror does not answer or lacks what a build needs (a Debian suite)."""

    exit_code = 1


class VerifyFailed(ImagepipeError):
    """An artifact did not pass verification (qemu-img check, checksum, boot test)."""

    exit_code = 1


class Interrupted(ImagepipeError):
    """SIGINT or SIGTERM arrived; cleanups have run."""

    exit_code = 130


class LockBusy(ImagepipeError):
    """Another process holds the lock for this image."""

    exit_code = 75


class UnsafePath(ImagepipeError):
    """A path imagepipe would write or delete is not its own (a planted link, a foreign file, a
    folder outside its output): refused, nothing touched."""

    exit_code = 1


class StorageError(ImagepipeError):
    """The disk said no: full, read-only, or not writable for us (the message names the path and
    the free space)."""

    exit_code = 1


class CorruptState(ImagepipeError):
    """A file imagepipe wrote earlier (manifest, history, state) cannot be read back."""

    exit_code = 1


class InternalError(ImagepipeError):
    """A bug: an exception nobody expected. The message says where the full trace was kept."""

    exit_code = 70


class HostKeyUnknown(ImagepipeError):
    """The builder's host key is not in known_hosts (and accepting it was not asked for)."""

    exit_code = 4


class HostKeyChanged(ImagepipeError):
    """The builder presented a different key than known_hosts holds: possible interception."""

    exit_code = 4


class BuilderUnreachable(ImagepipeError):
    """Connecting or authenticating to a builder failed."""

    exit_code = 4


class IsoUnavailable(ImagepipeError):
    """The ISO (or its CHECKSUM file) cannot be fetched; one line naming the URL and the fix."""

    exit_code = 1


class QmpError(ImagepipeError):
    """The QMP socket refused a command or went away."""


# ----------------------------------------------------------------------------------------------
# Raised inside a layer and turned into one of the errors above (with the key path, the URL or
# the file) by whoever called it; a user never sees these as they are.


class NumberError(ValueError):
    """Text that is not a number in the expected range; the message says what was expected."""


class Invalid(Exception):
    """One problem with one value (the collector adds the key path)."""


class NotFound(Exception):
    """HTTP 404/410: the file is not (or no longer) on this mirror."""


class ChecksumMismatch(Exception):
    """The finished download's sha256 (args[0]) is not the expected one."""


class MachinesError(ValueError):
    """A line nix itself would reject (bad number, bad host key)."""
