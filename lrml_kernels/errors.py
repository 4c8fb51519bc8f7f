"""The package's exception types, importable by every backend without the backend registry."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it
    (``pip install 'lrml_kernels[tune]'``)."""


class LRMLWarning(UserWarning):
    """Something the caller should know that does not stop the work (the CLI prints it as one
    ``lrml <command>: warning: ...`` line)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``kill``, ``timeout``, a batch scheduler, a closed terminal), raised
    where Ctrl-C raises :class:`KeyboardInterrupt`, so that a command stops as on Ctrl-C:
    training checkpoints the step it reached, temporary files are removed. ``signum``: the
    signal; ``128 + signum`` is the exit status a shell expects."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
