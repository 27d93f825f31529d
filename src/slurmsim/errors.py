"""The exceptions the Slurm simulator raises: :class:`SlurmSimError` and its subclasses."""


class SlurmSimError(RuntimeError):
    """Base class of every error raised by this package."""


class SlurmUnavailable(SlurmSimError):
    """Slurm cannot be used here at all (not root, cannot install, no netns)."""


class ClusterAlreadyRunning(SlurmSimError):
    """A cluster started from the same workdir is still running."""


class SlurmStartError(SlurmSimError):
    """The daemons did not come up; the message carries the log tails."""
