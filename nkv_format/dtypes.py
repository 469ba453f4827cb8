"""Every dtype name NKV uses, mapped to torch once.

Two vocabularies meet here: the format's row dtypes (safetensors names, spec §3:
"F32", "F16", "BF16") and the names people type (`--dtype float32`, `BuildConfig.dtype`).
"""

from __future__ import annotations

import torch

from .constants import ROW_DTYPES as _ROW_NAMES

# spec name -> torch, in the spec's order
ROW_DTYPES: dict[str, torch.dtype] = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# every dtype the reader turns into a tensor: the row dtypes, the int8 rows (1.3), the fact bytes
TENSOR_DTYPES: dict[str, torch.dtype] = {**ROW_DTYPES, "I8": torch.int8, "U8": torch.uint8}
# torch -> spec name
ROW_DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in ROW_DTYPES.items()}
# what a user types -> torch
TORCH_DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                        "float16": torch.float16}

assert tuple(ROW_DTYPES) == _ROW_NAMES, "constants.ROW_DTYPES and this table must agree"
assert set(TORCH_DTYPES.values()) == set(ROW_DTYPES.values())


def row_dtype_name(dtype: torch.dtype) -> str:
    """The spec's name of `dtype` ("F32"), or its torch name when the format has none."""
    return ROW_DTYPE_NAMES.get(dtype, str(dtype))


__all__ = ["ROW_DTYPES", "TENSOR_DTYPES", "ROW_DTYPE_NAMES", "TORCH_DTYPES", "row_dtype_name"]
