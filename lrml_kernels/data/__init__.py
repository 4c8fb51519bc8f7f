"""The data layer: readers -> :class:`Interactions` -> leave-one-out :class:`Split` -> samplers."""

from lrml_kernels.data.interactions import MISSING_TIMESTAMP, DataFormatError, Interactions, Split
from lrml_kernels.data.readers import (
    read_citeulike,
    read_csv,
    read_movielens,
    read_ncf,
    read_netflix,
)
from lrml_kernels.data.split import build_csr, leave_one_out

__all__ = [
    "MISSING_TIMESTAMP",
    "DataFormatError",
    "Interactions",
    "Split",
    "build_csr",
    "leave_one_out",
    "read_citeulike",
    "read_csv",
    "read_movielens",
    "read_ncf",
    "read_netflix",
]
