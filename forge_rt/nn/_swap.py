"""Class swaps: patching one module instance by giving it a run-time subclass of its own class.

Nothing is stored on the instance, so isinstance, the class name, parameter names and state dicts are
unchanged, and the patch survives copy.deepcopy, pickling and torch.save / torch.load(weights_only=False)
(a bound method stored in the instance's __dict__ would not pickle)."""
from __future__ import annotations

from typing import Callable

_CLASSES: dict[tuple, type] = {}  # (members, stock class) -> its swapped subclass


def stock_class(cls: type) -> type:
    """The class a swapped class was made from (`cls` itself if it was not swapped)."""
    return getattr(cls, "_forge_rt_stock_class", cls)


def is_swapped(obj, members: Callable[[type], dict]) -> bool:
    """Whether `obj`'s class is a swap of its stock class by `members`."""
    return type(obj) is _CLASSES.get((members, stock_class(type(obj))))


def swapped_class(stock: type, members: Callable[[type], dict]) -> type:
    """The subclass of `stock` with the attributes `members(stock)` (one class per members and stock).
    `members` must be a module-level function: pickles name it to rebuild the class."""
    key = (members, stock)
    if key in _CLASSES:
        return _CLASSES[key]

    def __reduce_ex__(self, protocol):
        # rebuilt through swapped_instance: the subclass is made at run time, so pickle can't name it
        return (swapped_instance, (stock, members), *super(cls, self).__reduce_ex__(protocol)[2:])

    cls = type(stock.__name__, (stock,), {
        **members(stock), "__reduce_ex__": __reduce_ex__, "_forge_rt_stock_class": stock,
        "__module__": stock.__module__, "__qualname__": stock.__qualname__})
    _CLASSES[key] = cls
    return cls


def swapped_instance(stock: type, members: Callable[[type], dict]):
    """An empty instance of the swapped class, for unpickling / deepcopy to fill in."""
    cls = swapped_class(stock, members)
    return cls.__new__(cls)
