"""The Redis Lua scripts: one ``.lua`` file each in ``feed/lua/``, read once per process.

Every script names the keys it touches through ``KEYS`` (built by :mod:`feed.keys`, the one owner
of key and channel names) and gets everything else (channel names, frame pieces from
:mod:`schemas.frames`, limits) through ``ARGV``. A store registers the scripts it runs once, in
its constructor (``redis-py``'s ``register_script``: ``EVALSHA``, loading the script on a
``NOSCRIPT``).
"""

from __future__ import annotations

import functools
from importlib import resources

__all__ = ["source"]


@functools.cache
def source(name: str) -> str:
    """The text of ``feed/lua/<name>.lua``."""
    return resources.files("feed").joinpath("lua", f"{name}.lua").read_text(encoding="utf-8")
