"""The package's exception types, importable by every backend without the backend registry."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it
    (``pip install 'lrml_kernels[tune]'``)."""


class LRMLWarning(UserWarning):
    """Something the caller should know that does not stop the work (the CLI prints it as one
    ``lrml <command>: warning: ...`` line)."""
