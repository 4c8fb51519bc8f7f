"""The package's exception types, importable by every backend without the backend registry."""


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why."""


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names the extra that installs it
    (``pip install 'lrml_kernels[tune]'``)."""
