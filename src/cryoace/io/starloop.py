"""STAR files as streams: where each data block lies in the file, its rows in chunks, rows written back.

:func:`scan_star` reads the file once, line by line, and returns a :class:`Loop` per ``data_`` block:
its column labels, the byte range of its rows and their count — not the rows themselves. A block of
``_label value`` pairs (no ``loop_``) is a loop of one row. :func:`iter_loop` then parses a loop's
rows in chunks of about ``chunk_rows`` rows with pandas' C parser (whitespace-separated; ``'`` and
``"`` quote; ``#`` starts a comment; blank lines are skipped — as the ``starfile`` package reads them),
so no more than one chunk of text is in memory at once. A row with more or fewer values than the loop
has columns is an error naming the file and the line. :func:`read_loop` reads a (small) loop whole,
numbers parsed as numbers wherever a whole column parses, like ``starfile``.

:class:`LoopColumns` is a set of columns of one loop that stays in the file: values are read when
asked for (a file changed since is an error). :func:`write_loop_header` and :func:`format_rows` write
RELION loops: float32 values with the shortest text that reads back to the same float32, float64
values with 12 significant digits, text quoted when it holds whitespace.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import shlex
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import CryoaceInputError
from .columns import CHUNK_ROWS

__all__ = ["Loop", "scan_star", "iter_loop", "read_loop", "numericise", "LoopColumns",
           "write_loop_header", "format_rows", "write_loop", "one_line"]


def one_line(exc: BaseException) -> str:
    """An exception's text on one line (at most 300 characters)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:300]


@dataclasses.dataclass(frozen=True)
class Loop:
    """One ``data_`` block of a STAR file, located but not read.

    name       : the block name after ``data_`` (``""`` for a bare ``data_``).
    labels     : column labels without the leading ``_``.
    start, end : byte range of the rows (from the first row to the next ``data_`` line or the end).
    first_line : 1-based line number of the first row.
    n_rows     : number of rows (lines that are neither blank nor comments).
    pairs      : for a block of ``_label value`` lines (no ``loop_``), its values (one row); else None.
    """

    name: str
    labels: tuple[str, ...]
    start: int = 0
    end: int = 0
    first_line: int = 0
    n_rows: int = 0
    pairs: tuple[str, ...] | None = None


class _Scanner:
    """The state machine of :func:`scan_star` (one line at a time)."""

    def __init__(self, path: Path):
        self.path = path
        self.blocks: dict[str, Loop] = {}
        self.name: str | None = None

    def open_block(self, name: str) -> None:
        self.name, self.mode = name, "start"
        self.labels: list[str] = []
        self.pairs: list[str] = []
        self.start = self.first_line = self.n_rows = 0

    def close_block(self, end: int) -> None:
        if self.name is None:
            return
        seen: set[str] = set()
        for label in self.labels:
            if label in seen:  # which of the two would be meant is unknowable
                raise CryoaceInputError(f"column _{label} appears twice in data_{self.name}", self.path)
            seen.add(label)
        if self.mode == "pairs":
            loop = Loop(self.name, tuple(self.labels), n_rows=1, pairs=tuple(self.pairs))
        else:
            start = self.start if self.n_rows else end
            loop = Loop(self.name, tuple(self.labels), start, end, self.first_line, self.n_rows)
        self.blocks[self.name] = loop

    def line(self, text: bytes, lineno: int, offset: int) -> None:
        if text.startswith(b"data_"):
            self.close_block(offset)
            self.open_block(text[5:].decode("utf-8", errors="replace"))
            return
        if self.name is None or not text:
            return
        mode = self.mode
        if mode == "header" and text.startswith(b"_"):
            self.labels.append(text.split()[0][1:].decode("utf-8", errors="replace"))
        elif mode in ("rows", "header"):
            self.mode = "rows"
            if not text.startswith(b"#"):
                if self.n_rows == 0:
                    self.start, self.first_line = offset, lineno
                self.n_rows += 1
        elif text.startswith(b"loop_"):
            self.mode = "header"
        elif text.startswith(b"_") and mode in ("start", "pairs"):
            self.mode = "pairs"
            try:
                key, value = shlex.split(text.decode("utf-8", errors="replace"), comments=True)
            except ValueError:
                raise CryoaceInputError(f"line {lineno} is not a '_label value' pair", self.path) from None
            self.labels.append(key[1:])
            self.pairs.append(value)


def scan_star(path: str | os.PathLike) -> dict[str, Loop]:
    """Every ``data_`` block of a STAR file (key = block name), located in one pass over its lines."""
    path = Path(path)
    if not path.is_file():
        raise CryoaceInputError("file not found", path)
    scanner = _Scanner(path)
    offset = 0
    try:
        with open(path, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                scanner.line(raw.strip(), lineno, offset)
                offset += len(raw)
    except OSError as exc:
        raise CryoaceInputError(f"cannot read the file ({one_line(exc)})", path) from None
    scanner.close_block(offset)
    if not scanner.blocks:
        raise CryoaceInputError("not a STAR file with data: no data_ block found", path)
    return scanner.blocks


# ---------------------------------------------------------------------------------------------
# Reading rows
# ---------------------------------------------------------------------------------------------

def _fields(line: str) -> int:
    """Number of values on a row (quotes group, ``#`` ends the row)."""
    try:
        return len(shlex.split(line, comments=True))
    except ValueError:  # an unterminated quote
        return -1


def _rows_with_lines(text: bytes, first_line: int) -> Iterator[tuple[int, str]]:
    """(line number, text) of each row in ``text`` (blank and comment lines skipped)."""
    for k, raw in enumerate(text.decode("utf-8", errors="replace").split("\n")):
        s = raw.strip()
        if s and not s.startswith("#"):
            yield first_line + k, s


def _bad_row(loop: Loop, text: bytes, first_line: int, path: Path,
             positions: Sequence[int] | None = None) -> CryoaceInputError | None:
    """The error for the first row (of ``positions``, or any) whose value count is not the loop's."""
    wanted = None if positions is None else set(int(p) for p in positions)
    for k, (lineno, line) in enumerate(_rows_with_lines(text, first_line)):
        if wanted is not None and k not in wanted:
            continue
        count = _fields(line)
        if count != len(loop.labels):
            what = "an unterminated quote" if count < 0 else f"{count} values"
            return CryoaceInputError(f"line {lineno} has {what} but data_{loop.name} has "
                                     f"{len(loop.labels)} columns (a truncated or malformed row)", path)
    return None


#: indented blank and comment lines (pandas would read them as a row of empty values)
_BLANK = re.compile(rb"^[ \t\r\f\v]+(?:#[^\n]*)?$", re.MULTILINE)


def _missing(values: pd.Series) -> np.ndarray:
    """Rows where a parsed column has no value (the row was too short)."""
    if values.dtype.kind in "biufc":
        return np.zeros(len(values), dtype=bool)
    return (values.isna() | (values == "")).to_numpy(dtype=bool)


def _parse_chunk(text: bytes, loop: Loop, first_line: int, path: Path, as_text: bool) -> pd.DataFrame:
    """Rows of one chunk of a loop's text, every value count checked."""
    ncol = len(loop.labels)
    if b"'" in text:
        text = text.replace(b"'", b'"')
    text = _BLANK.sub(b"", text)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a long first row is caught below
            frame = pd.read_csv(io.BytesIO(text), sep=r"\s+", header=None, names=list(range(ncol + 1)),
                                index_col=False, comment="#", keep_default_na=False, na_values=[],
                                dtype=str if as_text else None, engine="c")
    except (pd.errors.ParserError, ValueError, UnicodeDecodeError) as exc:
        raise _bad_row(loop, text, first_line, path) or CryoaceInputError(
            f"not a readable STAR file (data_{loop.name}: {one_line(exc)})", path) from None
    suspect = ~_missing(frame[ncol])
    if ncol:
        suspect |= _missing(frame[ncol - 1])
    if suspect.any():
        error = _bad_row(loop, text, first_line, path, np.flatnonzero(suspect))
        if error is not None:
            raise error
    return frame.drop(columns=[ncol]).set_axis(list(loop.labels), axis=1)


def iter_loop(path: str | os.PathLike, loop: Loop, columns: Sequence[str] | None = None,
              as_text: bool = False, chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
    """The rows of ``loop`` in consecutive chunks of about ``chunk_rows`` rows (bytes are read in
    blocks of ``chunk_rows`` average rows, cut at a line end).

    Each chunk is a DataFrame indexed by row number (0-based over the whole loop) with the ``columns``
    asked for (default all). ``as_text`` keeps every value as the text in the file; otherwise pandas
    parses numbers. A row with the wrong number of values raises :class:`CryoaceInputError` naming
    the file and line.
    """
    path = Path(path)
    wanted = list(loop.labels) if columns is None else list(columns)
    if loop.pairs is not None:
        frame = pd.DataFrame([loop.pairs], columns=list(loop.labels), dtype=str)
        yield frame[wanted] if as_text else numericise(frame[wanted])
        return
    if loop.n_rows == 0:
        return
    block = max(1, (loop.end - loop.start) // loop.n_rows) * max(1, int(chunk_rows))
    row, line, carry = 0, loop.first_line, b""
    with open(path, "rb") as fh:
        fh.seek(loop.start)
        remaining = loop.end - loop.start
        while remaining > 0 or carry:
            data = fh.read(min(block, remaining))
            if remaining > 0 and not data:
                raise CryoaceInputError("the file got shorter while it was read", path)
            remaining -= len(data)
            buf = carry + data
            cut = len(buf) if remaining <= 0 else buf.rfind(b"\n") + 1
            if cut == 0:  # a line longer than the block: read on
                carry = buf
                continue
            text, carry = buf[:cut], buf[cut:]
            frame = _parse_chunk(text, loop, line, path, as_text)[wanted]
            frame.index = pd.RangeIndex(row, row + len(frame))
            row += len(frame)
            line += text.count(b"\n")
            if len(frame):
                yield frame
    if row != loop.n_rows:  # the file changed since it was scanned
        raise CryoaceInputError(f"data_{loop.name}: found {row} rows where {loop.n_rows} were expected", path)


def numericise(frame: pd.DataFrame) -> pd.DataFrame:
    """Columns whose every value is a number become numeric (as ``starfile`` reads them)."""
    out = {}
    for col in frame.columns:
        try:
            out[col] = pd.to_numeric(frame[col])
        except (ValueError, TypeError):
            out[col] = frame[col]
    return pd.DataFrame(out, index=frame.index)


def read_loop(path: str | os.PathLike, loop: Loop, columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A whole loop as one DataFrame (numbers where a column is all numbers); for small loops."""
    chunks = list(iter_loop(path, loop, columns, as_text=True))
    labels = list(loop.labels) if columns is None else list(columns)
    frame = pd.concat(chunks) if chunks else pd.DataFrame(columns=labels, dtype=str)
    return numericise(frame.reset_index(drop=True))


# ---------------------------------------------------------------------------------------------
# Columns that stay in the file
# ---------------------------------------------------------------------------------------------

def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


@dataclasses.dataclass(frozen=True)
class LoopColumns:
    """Columns ``names`` of the rows ``rows`` (None: all, in order) of a loop, read from the file when
    needed. ``stamp`` (size, mtime) is the file's when it was read: reading a changed file is an error."""

    path: Path
    loop: Loop
    names: tuple[str, ...]
    rows: np.ndarray | None = None
    stamp: tuple[int, int] | None = None

    @classmethod
    def of(cls, path: Path, loop: Loop, names: Sequence[str]) -> LoopColumns:
        return cls(Path(path), loop, tuple(names), None, _stamp(Path(path)))

    def __len__(self) -> int:
        return self.loop.n_rows if self.rows is None else len(self.rows)

    def take(self, rows: np.ndarray) -> LoopColumns:
        """The rows ``rows`` (positions in this selection)."""
        rows = np.asarray(rows, dtype=np.int64)
        return dataclasses.replace(self, rows=rows if self.rows is None else self.rows[rows])

    def _check(self) -> None:
        try:
            unchanged = _stamp(self.path) == self.stamp
        except OSError:
            unchanged = False
        if not unchanged:
            raise CryoaceInputError("the particle file changed or disappeared since it was read; its other "
                                    "columns are read from it when needed (read it again)", self.path)

    def frame(self) -> pd.DataFrame:
        """Every selected row as one DataFrame (numbers where a column is all numbers)."""
        self._check()
        whole = read_loop(self.path, self.loop, self.names)
        return whole if self.rows is None else whole.iloc[self.rows].reset_index(drop=True)

    def frames(self, columns: Sequence[str] | None = None,
               chunk_rows: int = CHUNK_ROWS) -> Iterator[pd.DataFrame]:
        """The selected rows as text, in consecutive chunks indexed by position in the selection.

        Streams the file when the selection is in file order (the usual case); a shuffled selection
        is read whole first.
        """
        self._check()
        columns = list(self.names if columns is None else columns)
        chunks = iter_loop(self.path, self.loop, columns, as_text=True, chunk_rows=chunk_rows)
        rows = self.rows
        if rows is None:
            yield from chunks
            return
        if len(rows) > 1 and not bool(np.all(rows[1:] >= rows[:-1])):
            whole = pd.concat(list(chunks))
            for start in range(0, len(rows), chunk_rows):
                part = whole.iloc[rows[start:start + chunk_rows]]
                yield part.set_axis(pd.RangeIndex(start, start + len(part)))
            return
        done = 0
        for chunk in chunks:
            stop = int(np.searchsorted(rows, chunk.index[-1], side="right"))
            if stop > done:
                part = chunk.iloc[rows[done:stop] - chunk.index[0]]
                yield part.set_axis(pd.RangeIndex(done, stop))
                done = stop


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------

def write_loop_header(fh, name: str, labels: Sequence[str]) -> None:
    """``data_<name>``, ``loop_`` and the numbered labels."""
    fh.write(f"\n# version 30001\n\ndata_{name}\n\nloop_\n")
    fh.write("".join(f"_{label} #{k}\n" for k, label in enumerate(labels, 1)))


def _text(values: pd.Series) -> pd.Series:
    """Text values, quoted when they hold whitespace or are empty; missing values as ``<NA>``."""
    text = values.astype(str)
    quote = text.str.contains(r"\s", regex=True) | (text == "")
    text = text.where(~quote, '"' + text + '"')
    return text.where(values.notna(), "<NA>")


def format_rows(frame: pd.DataFrame) -> str:
    """The rows of ``frame`` as STAR loop lines (tab-separated; see the module docstring for numbers)."""
    out = {}
    for k, name in enumerate(frame.columns):
        values = frame[name]
        if values.dtype == np.float32:
            out[k] = values.to_numpy().astype(str)
        elif values.dtype.kind in "biuf":
            out[k] = values
        else:
            out[k] = _text(values)
    return pd.DataFrame(out, index=frame.index).to_csv(sep="\t", header=False, index=False,
                                                        float_format="%.12g", quoting=csv.QUOTE_NONE,
                                                        na_rep="<NA>", lineterminator="\n")


def write_loop(fh, name: str, frame: pd.DataFrame) -> None:
    """A whole (small) loop: header and rows."""
    write_loop_header(fh, name, [str(c) for c in frame.columns])
    fh.write(format_rows(frame))
