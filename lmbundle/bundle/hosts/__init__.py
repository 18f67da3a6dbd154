"""The hosts a bundle is checked against, one module of rules each (`lmbundle info --check --host`):

- `apple-86b363d`: Apple's loader and pipelined engine at the snapshot in hand (apple_86b363d.py);
- `apple-main`: the same after the merged pull requests #204, #227, #240, #249/#251 (apple_main.py);
- `zoo`: the zoo's patched pipelined engine, the seeds' run path (zoo.py), the host a bundle ships for.

Every host loads bundles with Apple's loader (loader.py).
"""

from __future__ import annotations

from . import apple_86b363d, apple_main, loader, zoo
from .base import Add, Subject

HOST_CHECKS = {"apple-86b363d": apple_86b363d.check, "apple-main": apple_main.check, "zoo": zoo.check}
HOSTS = tuple(HOST_CHECKS)
SHIP_HOST = "zoo"


def check_host(host: str, subject: Subject, add: Add) -> None:
    """Every rule of `host`: the loader's, then its engine's (when the asset could be read)."""
    loader.check(subject, add)
    if subject.functions is not None:
        HOST_CHECKS[host](subject, add)
