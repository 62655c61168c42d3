"""Communication layer (no network I/O): significance-triggered sending with error feedback,
compression codecs, tensor-dict coding and byte accounting.

Example:
    >>> from chronos.communication import SignificanceFilter
    >>> SignificanceFilter().threshold
    0.01
"""

from chronos.communication.codecs import (
    WIRE_DTYPES,
    Cast,
    Codec,
    CodecError,
    Identity,
    Int8,
    TopK,
    parse_codec,
)
from chronos.communication.feedback import (
    Compressed,
    ErrorFeedbackCompressor,
    compress,
    decode_dict,
    encode_dict,
    wire_bytes,
)
from chronos.communication.significance import (
    FilterState,
    SignificanceConfig,
    SignificanceFilter,
    filter_step,
    init_filter,
    significance,
)

__all__ = [
    "WIRE_DTYPES",
    "Cast",
    "Codec",
    "CodecError",
    "Compressed",
    "ErrorFeedbackCompressor",
    "FilterState",
    "Identity",
    "Int8",
    "SignificanceConfig",
    "SignificanceFilter",
    "TopK",
    "compress",
    "decode_dict",
    "encode_dict",
    "filter_step",
    "init_filter",
    "parse_codec",
    "significance",
    "wire_bytes",
]
