"""The maths of every method: pure functions, tensors in, tensor out, no I/O."""

from .registry import MethodSpec, Param, Reducer, TensorJob, all_methods, get_method, register

__all__ = ["MethodSpec", "Param", "Reducer", "TensorJob", "all_methods", "get_method", "register"]
