"""The safetensors dtype vocabulary and its mapping to torch.

Headers name dtypes as strings ("BF16", "F8_E4M3"); everything that plans from headers (sizes,
output layouts, dry-run estimates) works on those strings and only converts to torch at load.
"""

from __future__ import annotations

import torch

from .errors import UsageError

_ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("F8_E4M3FNUZ", "float8_e4m3fnuz"),
    ("F8_E5M2FNUZ", "float8_e5m2fnuz"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
):
    if hasattr(torch, _attr):
        _ST_TO_TORCH[_name] = getattr(torch, _attr)

_TORCH_TO_ST = {v: k for k, v in _ST_TO_TORCH.items()}

ITEMSIZE: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E4M3FNUZ": 1, "F8_E5M2FNUZ": 1, "U16": 2,
    "U32": 4, "U64": 8,
}

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2", "F8_E4M3FNUZ", "F8_E5M2FNUZ"})

# Names users write in recipes and on the command line.
_USER_NAMES: dict[str, str] = {
    "float32": "F32", "fp32": "F32", "f32": "F32",
    "float16": "F16", "fp16": "F16", "f16": "F16", "half": "F16",
    "bfloat16": "BF16", "bf16": "BF16",
    "float64": "F64", "fp64": "F64",
}

# What config.json's torch_dtype calls each float dtype.
CONFIG_NAMES: dict[str, str] = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def to_torch(st_dtype: str) -> torch.dtype:
    """The torch dtype for a safetensors dtype string."""
    try:
        return _ST_TO_TORCH[st_dtype]
    except KeyError:
        raise UsageError(f"unsupported tensor dtype {st_dtype!r}") from None


def from_torch(dtype: torch.dtype) -> str:
    """The safetensors dtype string for a torch dtype."""
    try:
        return _TORCH_TO_ST[dtype]
    except KeyError:
        raise UsageError(f"unsupported torch dtype {dtype}") from None


def torch_name(dtype: torch.dtype) -> str:
    """'bfloat16' for torch.bfloat16: how messages and config files name a torch dtype."""
    return str(dtype).replace("torch.", "")


def parse_user_dtype(name: str) -> str:
    """Parse a dtype a user wrote ("bfloat16", "bf16", "BF16") into a safetensors string."""
    key = name.strip()
    if key.upper() in _ST_TO_TORCH and key.upper() in FLOAT_DTYPES:
        return key.upper()
    try:
        return _USER_NAMES[key.lower()]
    except KeyError:
        choices = ", ".join(sorted({"float32", "float16", "bfloat16", "float64"}))
        raise UsageError(f"unknown dtype {name!r} (choose one of {choices})") from None


def is_float(st_dtype: str) -> bool:
    return st_dtype in FLOAT_DTYPES
