"""Registries: the one list of each enumerable kind of thing (architectures, steering methods,
attribution methods), filled by a decorator where each thing is defined.

A registry is a dict from name to thing, in registration order, so the CLI's choices, the
configs' checks and the documentation tables all read the same keys.

Example::

    METHODS: Registry[Callable] = Registry("steering method")

    @METHODS.register("caa")
    def build_caa(...): ...

    METHODS.lookup("caa")   # build_caa; an unknown name is a one-line error listing the names
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from saelab.errors import SaelabError

T = TypeVar("T")


class Registry(dict[str, T]):
    """Name → thing, with a registering decorator and a lookup whose error lists the names."""

    def __init__(self, what: str, *, sorted_names: bool = False) -> None:
        super().__init__()
        self.what = what
        """What the things are, for messages: ``"SAE architecture"``."""
        self.sorted_names = sorted_names
        """List the names sorted in messages (else in registration order)."""

    def register(self, *names: str) -> Callable[[T], T]:
        """Decorator: register the decorated thing under each of ``names``. A name has one thing;
        registering another under it is an error (the first stays)."""

        def add(thing: T) -> T:
            for name in names:
                if name in self and self[name] is not thing:
                    raise SaelabError(
                        f"{self.what} {name!r} is already registered "
                        f"({getattr(self[name], '__name__', self[name])}); "
                        f"register {getattr(thing, '__name__', thing)} under another name"
                    )
            self.update(dict.fromkeys(names, thing))
            return thing

        return add

    def choices(self) -> str:
        names = sorted(self) if self.sorted_names else list(self)
        return ", ".join(names)

    def lookup(self, name: str) -> T:
        """The thing registered as ``name``; an unknown name is a one-line error listing all."""
        if name not in self:
            raise SaelabError(f"unknown {self.what} {name!r}; choose one of: {self.choices()}")
        return self[name]
