"""The data layer: reader -> :class:`Interactions` -> leave-one-out :class:`Split` -> sampler.

``load(spec)`` is the one entry point most code needs; see :data:`FORMS` for the specs.
"""

from lrml_kernels.data.interactions import MISSING_TIMESTAMP, DataFormatError, Interactions, Split
from lrml_kernels.data.readers import (
    cache_dir,
    read_citeulike,
    read_csv,
    read_movielens,
    read_movielens_ratings,
    read_ncf,
    read_netflix,
    read_netflix_mat,
)
from lrml_kernels.data.sampling import csr_membership, popularity_cdf, sample_negatives
from lrml_kernels.data.side_info import MovieLensSideInfo, read_movielens_side_info
from lrml_kernels.data.sources import FORMS, SYNTHETIC, check_min_rating, load, read_source
from lrml_kernels.data.split import (
    build_csr,
    carve_validation,
    leave_one_out,
    sample_eval_negatives,
)
from lrml_kernels.data.synthetic_data import synthetic, write_netflix_format

__all__ = [
    "FORMS",
    "MISSING_TIMESTAMP",
    "SYNTHETIC",
    "DataFormatError",
    "Interactions",
    "MovieLensSideInfo",
    "Split",
    "build_csr",
    "cache_dir",
    "carve_validation",
    "check_min_rating",
    "csr_membership",
    "leave_one_out",
    "load",
    "popularity_cdf",
    "read_citeulike",
    "read_csv",
    "read_movielens",
    "read_movielens_ratings",
    "read_movielens_side_info",
    "read_ncf",
    "read_netflix",
    "read_netflix_mat",
    "read_source",
    "sample_eval_negatives",
    "sample_negatives",
    "synthetic",
    "write_netflix_format",
]
