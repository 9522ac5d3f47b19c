"""One progress bar for long work: transient, on stderr (stdout stays for results), rich."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def progress(label: str | None, total: int, *, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """Yield `advance(n)` for a bar of `total` steps labelled `label`; a no-op without a label, when
    not `enabled` (another rank, a quiet caller) or with nothing to do."""
    if label is None or not enabled or total <= 0:
        yield lambda n: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(label, total=total)
        yield lambda n: bar.advance(task, n)


def tracked(items: Iterable[T], label: str | None, total: int) -> Iterator[T]:
    """`items`, advancing a `progress` bar by one per item."""
    with progress(label, total) as advance:
        for item in items:
            yield item
            advance(1)
