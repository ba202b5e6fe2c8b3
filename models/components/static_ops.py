"""Ops that also trace under Paddle's legacy static IR (``model.pdmodel`` export).

Paddle 3 implements ``paddle.sum``, ``sqrt``, ``exp``, ``argmin`` and ``argmax`` (like
``paddle.matmul`` and ``paddle.amax``) for eager and PIR tensors only: tracing them under the legacy
IR (``FLAGS_enable_pir_api=0`` or ``paddle.pir_utils.DygraphOldIrGuard``) fails with "must be
Value, but got Variable". These call the Paddle API in eager and PIR mode and append the legacy
operator otherwise, so one layer exports to both ``model.json`` and ``model.pdmodel`` with the same
kernels. (For matmul and max the layers use ``@`` and ``paddle.max``, which already support both
IRs.)
"""

from __future__ import annotations

from typing import Any

import paddle
from paddle.framework import LayerHelper, in_dynamic_or_pir_mode


def _legacy_op(kind: str, x: paddle.Tensor, attrs: dict[str, Any],
               dtype: str | None = None) -> paddle.Tensor:
    """Append the legacy operator ``kind`` with input X = ``x`` and one output (of ``dtype``, by
    default x's) to the program."""
    helper = LayerHelper(kind)
    out = helper.create_variable_for_type_inference(dtype or x.dtype)
    helper.append_op(type=kind, inputs={"X": x}, outputs={"Out": out}, attrs=attrs)
    return out


def reduce_sum(x: paddle.Tensor, axis: int) -> paddle.Tensor:
    """``paddle.sum(x, axis=axis)``: the input's shape without ``axis``."""
    if in_dynamic_or_pir_mode():
        return paddle.sum(x, axis=axis)
    return _legacy_op("reduce_sum", x, {"dim": [axis], "keep_dim": False, "reduce_all": False})


def sqrt(x: paddle.Tensor) -> paddle.Tensor:
    """``paddle.sqrt(x)``, elementwise, same shape."""
    if in_dynamic_or_pir_mode():
        return paddle.sqrt(x)
    return _legacy_op("sqrt", x, {})


def non_negative(x: paddle.Tensor) -> paddle.Tensor:
    """``max(x, 0)`` elementwise, same shape; NaN stays NaN (``paddle.clip`` would make it 0)."""
    zero = paddle.zeros_like(x)
    if in_dynamic_or_pir_mode():
        return paddle.maximum(x, zero)
    helper = LayerHelper("elementwise_max")
    out = helper.create_variable_for_type_inference(x.dtype)
    helper.append_op(type="elementwise_max", inputs={"X": x, "Y": zero}, outputs={"Out": out},
                     attrs={"axis": -1})
    return out


def exp(x: paddle.Tensor) -> paddle.Tensor:
    """``paddle.exp(x)``, elementwise, same shape."""
    if in_dynamic_or_pir_mode():
        return paddle.exp(x)
    return _legacy_op("exp", x, {})


def arg_min(x: paddle.Tensor, axis: int) -> paddle.Tensor:
    """``paddle.argmin(x, axis=axis)``: int64 indices, the input's shape without ``axis``."""
    return _arg("min", x, axis)


def arg_max(x: paddle.Tensor, axis: int) -> paddle.Tensor:
    """``paddle.argmax(x, axis=axis)``: int64 indices, the input's shape without ``axis``."""
    return _arg("max", x, axis)


def _arg(kind: str, x: paddle.Tensor, axis: int) -> paddle.Tensor:
    if in_dynamic_or_pir_mode():
        return (paddle.argmin if kind == "min" else paddle.argmax)(x, axis=axis)
    int64 = int(paddle.base.core.VarDesc.VarType.INT64)
    attrs = {"axis": axis, "keepdims": False, "flatten": False, "dtype": int64}
    return _legacy_op(f"arg_{kind}", x, attrs, "int64")
