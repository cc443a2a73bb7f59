"""Named registries: the extension points of mfp_jax.

Data sets, models, neurons, losses, optimizers and surrogates are each looked up by name in a
:class:`Registry`. The built-ins are registered through the same ``register_*`` call a user
makes, so a user's data set or model is as good as a shipped one, and every "unknown name"
error lists what is registered::

  import mfp_jax as mj

  @mj.register_model('my_net')
  class MyNet(nn.Module):
    ...

A name can be registered once; registering it again is an error (two plug-ins silently
replacing each other is worse than a clear clash).
"""

from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar('T')


class Registry(Generic[T]):
  """``name -> object`` for one kind of thing (``kind`` names it in error messages)."""

  def __init__(self, kind: str):
    self.kind = kind
    self._items: dict[str, T] = {}

  def register(self, name: str, obj: T | None = None):
    """Registers ``obj`` as ``name``; without ``obj`` returns a decorator.

    Raises:
      ValueError: ``name`` is not a non-empty string or is already registered.
    """
    if not isinstance(name, str) or not name:
      raise ValueError(f'a {self.kind} name must be a non-empty string, got {name!r}')
    if obj is None:
      return lambda o: self.register(name, o)
    if name in self._items:
      raise ValueError(f'{self.kind} {name!r} is already registered '
                       f'({self._items[name]!r}); pick another name')
    self._items[name] = obj
    return obj

  def get(self, name: str) -> T:
    """The object registered as ``name``.

    Raises:
      ValueError: unknown name; the message lists the registered ones.
    """
    if name not in self._items:
      raise ValueError(f'unknown {self.kind} {name!r}; allowed: {self.names()}')
    return self._items[name]

  def names(self) -> list[str]:
    """Registered names, in registration order."""
    return list(self._items)

  def __contains__(self, name: object) -> bool:
    return name in self._items

  def __iter__(self) -> Iterator[str]:
    return iter(self._items)

  def __len__(self) -> int:
    return len(self._items)

  def unregister(self, name: str) -> T:
    """Removes ``name`` (for tests and notebooks that re-run a registration cell)."""
    self.get(name)
    return self._items.pop(name)


def registrar(registry: Registry[T]) -> Callable:
  """``register_x(name, obj=None)`` bound to ``registry``, documented as such."""

  def register(name: str, obj: T | None = None):
    return registry.register(name, obj)

  register.__doc__ = (f'Registers a {registry.kind} under ``name`` (direct call or decorator); '
                      f'refuses a name that is taken. See :class:`mfp_jax.registry.Registry`.')
  return register
