"""Where the explainer's per-position rows go: kept in memory, or streamed to a Parquet file.

A probe set of N response tokens gives N rows of ~20 columns, so for a large probe set the table
must not be held at once. `explain_step` hands rows over a chunk at a time (one probe batch, about
`chunk_tokens` rows) and never keeps them itself; the sink decides what to keep:

    MemoryPositions    keeps every row and returns the whole DataFrame in probe-file order (the
                       default, and what library users got before sinks existed)
    ParquetPositions   writes each chunk as one row group of a temporary file beside the target and
                       moves it into place at the end (`atomic.atomic_path`), so a reader never sees
                       half a file and a failed run leaves none

Row order of the Parquet file: chunk by chunk, in processing order (prompts by length), each
response's rows contiguous and by position. Sort by (example_id, response_type, position) for the
in-memory order; a global re-sort would need the whole table, the thing streaming avoids.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from learndyn.atomic import atomic_path

Key = tuple[str, str]  # (example_id, response_type)


@runtime_checkable
class PositionsSink(Protocol):
    """Receives the explainer's position rows, one chunk at a time."""

    def add(self, rows: list[dict]) -> None:
        """One chunk: rows of whole responses, each response's rows in position order."""

    def finish(self, order: Mapping[Key, int]) -> Any:
        """All chunks are in; `order` ranks each response in probe-file order. Returns what
        `Explanation.positions` holds."""

    def abort(self) -> None:
        """The run failed: drop everything, leave no file behind."""


class MemoryPositions:
    """Keeps all rows; `finish` returns one DataFrame sorted into probe-file order."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, rows: list[dict]) -> None:
        self.rows.extend(rows)

    def finish(self, order: Mapping[Key, int]) -> Any:
        import pandas as pd

        rows, self.rows = self.rows, []
        return pd.DataFrame(sorted(rows, key=lambda r: (order[r["example_id"], r["response_type"]], r["position"])))

    def abort(self) -> None:
        self.rows = []


class ParquetPositions:
    """Streams rows to `path` as Parquet, one row group per chunk; `finish` returns `path`.

    Memory holds one chunk at a time. The file is written beside `path` under a temporary name and
    renamed over it only when `finish` runs, so an existing `path` stays intact until then.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._files = contextlib.ExitStack()
        self._writer: Any = None
        self._schema: Any = None
        self._tmp: Path | None = None
        self.row_groups = 0
        self.rows = 0

    def add(self, rows: list[dict]) -> None:
        import pandas as pd
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not rows:
            return
        frame = pd.DataFrame(rows)
        if self._writer is None:
            self._tmp = self._files.enter_context(atomic_path(self.path))
            table = pa.Table.from_pandas(frame, preserve_index=False)
            self._schema = table.schema
            self._writer = self._files.enter_context(pq.ParquetWriter(self._tmp, self._schema))
        else:
            table = pa.Table.from_pandas(frame, schema=self._schema, preserve_index=False)
        self._writer.write_table(table, row_group_size=max(len(rows), 1))
        self.row_groups += 1
        self.rows += len(rows)

    def finish(self, order: Mapping[Key, int]) -> Path:
        if self._writer is None:  # nothing came: still leave a (column-less) file, as the old writer did
            import pandas as pd

            self._tmp = self._files.enter_context(atomic_path(self.path))
            pd.DataFrame().to_parquet(self._tmp, index=False)
        self._files.close()  # the writer closes first (last in, first out), then the rename
        self._writer = None
        return self.path

    def abort(self) -> None:
        """Close the writer and delete the temporary file (`atomic_path` does so on an exception)."""
        err = sys.exc_info()[1] or RuntimeError("explain failed")
        try:
            self._files.__exit__(type(err), err, err.__traceback__)
        finally:
            self._writer = None


def positions_sink(out: PositionsSink | str | Path | None) -> PositionsSink:
    """None: in memory; a path: streamed to that Parquet file; a sink: itself."""
    if out is None:
        return MemoryPositions()
    if isinstance(out, (str, Path)):
        return ParquetPositions(out)
    if not isinstance(out, PositionsSink):
        from learndyn.errors import LearndynError

        raise LearndynError(f"positions_out must be None, a path or a positions sink, not {type(out).__name__}")
    return out
