"""Calling a component export without re-reading its type on every call.

wasmtime-py's ``Func.__call__`` asks the C API for the function's type on
every call and rebuilds every parameter and result type object from it, and
lifting a ``result``/``variant`` recomputes which Python classes its cases
map to. For a driver call that is most of the cost. :class:`Export` does
what ``Func.__call__`` does (same C calls, same conversions), with the
type objects read once per export and the derived facts (cases, fields,
whether a variant is tagged) kept on those objects. A ``list<u8>`` (what
``fs.read-at`` and ``fs.write-at`` move, SQLite's pages) is converted as one
block of memory instead of one Python call per byte.

Written against wasmtime-py 50 (``pyproject.toml`` pins ``>=50,<51``).
"""

from __future__ import annotations

import ctypes
from ctypes import byref, pointer
from typing import Any

from wasmtime import WasmtimeError
from wasmtime import _ffi as ffi
from wasmtime.component import _types
from wasmtime.component._enter import catch_exceptions, enter_wasm
from wasmtime.component._linker import FUNCTIONS, func_finalize
from wasmtime.component._types import FuncType

_MEMO = "_image_cache_memo"


def _memoized(cls, name: str) -> None:
    """Keep a type object's property (or method result) once computed:
    type objects are immutable, and the ones :class:`Export` holds live as
    long as the instance."""
    original = getattr(cls, name)
    is_property = isinstance(original, property)
    compute = original.fget if is_property else original

    def cached(self):
        memo = self.__dict__.get(_MEMO)
        if memo is None:
            memo = self.__dict__[_MEMO] = {}
        if name not in memo:
            memo[name] = compute(self)
        return memo[name]

    setattr(cls, name, property(cached) if is_property else cached)


for _cls, _names in [
    (_types.VariantLikeType, ["_tagged"]),
    (_types.VariantType, ["cases"]),
    (_types.RecordType, ["fields"]),
    (_types.ResultType, ["ok", "err"]),
    (_types.OptionType, ["payload"]),
    (_types.ListType, ["element", "_is_bytes"]),
    (_types.TupleType, ["elements"]),
    (_types.EnumType, ["names"]),
]:
    for _name in _names:
        if hasattr(_cls, _name):
            _memoized(_cls, _name)


# -- list<u8> as one block ---------------------------------------------------------

#: A ``wasmtime_component_val_t`` is a kind byte and a union; a byte list is
#: an array of them, each of kind U8 with its byte first in the union.
_VAL_SIZE = ctypes.sizeof(ffi.wasmtime_component_val_t)
_VAL_PAYLOAD = ffi.wasmtime_component_val_t.of.offset
_KIND_U8 = bytes((ffi.WASMTIME_COMPONENT_U8.value,))
assert ffi.wasmtime_component_val_t.kind.offset == 0


def _bytes_to_c(val: Any, ptr) -> None:
    if not isinstance(val, (bytes, bytearray, memoryview)):
        raise TypeError("expected bytes value")
    n = len(val)
    raw = ffi.wasmtime_component_vallist_t()
    ffi.wasmtime_component_vallist_new_uninit(raw, n)
    if n:
        block = bytearray(n * _VAL_SIZE)
        block[0::_VAL_SIZE] = _KIND_U8 * n
        block[_VAL_PAYLOAD::_VAL_SIZE] = val
        ctypes.memmove(raw.data, (ctypes.c_char * len(block)).from_buffer(block), len(block))
    ptr.contents.kind = ffi.WASMTIME_COMPONENT_LIST
    ptr.contents.of.list = raw


def _bytes_from_c(c) -> bytes:
    assert c.kind == ffi.WASMTIME_COMPONENT_LIST.value
    try:
        n = c.of.list.size
        if not n:
            return b""
        block = ctypes.string_at(c.of.list.data, n * _VAL_SIZE)
        return block[_VAL_PAYLOAD::_VAL_SIZE]
    finally:
        ffi.wasmtime_component_vallist_delete(byref(c.of.list))


_list_to_c = _types.ListType.convert_to_c
_list_from_c = _types.ListType.convert_from_c


def _convert_to_c(self, store, val, ptr):
    if self._is_bytes():
        return _bytes_to_c(val, ptr)
    return _list_to_c(self, store, val, ptr)


def _convert_from_c(self, c):
    if self._is_bytes():
        return _bytes_from_c(c)
    return _list_from_c(self, c)


_types.ListType.convert_to_c = _convert_to_c
_types.ListType.convert_from_c = _convert_from_c


class Export:
    """One exported function of one instance, with its types read once."""

    __slots__ = ("func", "params", "result")

    def __init__(self, func, store):
        self.func = func
        fty = func.type(store)
        self.params = [ty for _name, ty in fty.params]
        self.result = fty.result

    def __call__(self, store, *args: Any) -> Any:
        params = self.params
        if len(args) != len(params):
            raise TypeError(f"wrong number of parameters provided: given {len(args)}, expected {len(params)}")
        param_capi = (ffi.wasmtime_component_val_t * len(args))()
        n = 0
        try:
            for ty, val in zip(params, args):
                ty.convert_to_c(store, val, pointer(param_capi[n]))
                n += 1
            result_ty = self.result
            result_space = ffi.wasmtime_component_val_t() if result_ty is not None else None
            result_capi = byref(result_space) if result_space is not None else None
            result_len = 1 if result_space is not None else 0

            def run() -> "ctypes._Pointer[ffi.wasmtime_error_t]":
                return ffi.wasmtime_component_func_call(
                    byref(self.func._func), store._context(), param_capi, n, result_capi, result_len
                )

            enter_wasm(run)
            if result_space is None:
                return None
            return result_ty.convert_from_c(result_space)
        finally:
            for i in range(n):
                ffi.wasmtime_component_val_delete(byref(param_capi[i]))


# -- host functions -------------------------------------------------------------


class _HostFunc:
    __slots__ = ("fn", "types")

    def __init__(self, fn):
        self.fn = fn
        self.types = None


@ffi.wasmtime_component_func_callback_t
def _host_func_impl(idx, context, ty_raw, args, nargs, results, nresults):  # type: ignore
    # As wasmtime-py's own callback (`_linker.func_impl`), except that the
    # parameter and result types (owned copies) are read once per function.
    def run(store) -> None:
        host = FUNCTIONS.get(idx or 0)
        types = host.types
        if types is None:
            with FuncType._from_ptr(ty_raw, owner=store) as fty:
                types = host.types = ([ty for _n, ty in fty.params], fty.result)
        params, result_ty = types
        assert len(params) == nargs
        pyargs = [ty.convert_from_c(args[i]) for i, ty in enumerate(params)]
        result = host.fn(store, *pyargs)
        if result_ty is None:
            assert result is None
        else:
            result_ty.convert_to_c(store, result, results)

    return catch_exceptions(context, run)


def add_func(linker_instance, name: str, fn) -> None:
    """``LinkerInstance.add_func`` with :func:`_host_func_impl`."""
    linker_instance._assert_not_locked()
    name_bytes = name.encode("utf-8")
    buf = ctypes.create_string_buffer(name_bytes)
    idx = FUNCTIONS.allocate(_HostFunc(fn))
    err = ffi.wasmtime_component_linker_instance_add_func(
        linker_instance.ptr(), buf, len(name_bytes), _host_func_impl, idx, func_finalize
    )
    if err:
        raise WasmtimeError._from_ptr(err)
