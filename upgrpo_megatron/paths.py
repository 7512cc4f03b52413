"""Checks on the paths (and sizes) a command-line tool is given, made before it reads or writes anything.

- `refuse_overlap`: an output directory must not be, contain or lie inside an input. The converters replace
  their output directory as a whole under `--force`, so an output above the input deletes the input (a user
  exported `--checkpoint RUN/checkpoints/step_60 --out RUN --force` and lost the run, optimizer included);
  the report tools would write their pages among a run's files. Symlinks are resolved first.
- `require_dir`, `require_output_dir`: a directory where a directory goes, a file where a file goes, readable.
- `read_text`, `check_input_files`: text inputs must be readable UTF-8 (JSON / YAML must parse); the error
  names the file and the line.
- `require_positive`: a size such as `--tp` is at least 1 (0 divided by zero deep inside, -1 was accepted).

Every problem is a `ToolInputError` (an `UpgrpoError`): the tools print it as one `error:` line and exit 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable, Optional, Sequence, Tuple

from upgrpo_megatron.errors import UpgrpoError

# files read as text by the tools and the libraries under them; anything else is only opened (readable?)
TEXT_SUFFIXES = (".json", ".yaml", ".yml", ".jsonl", ".txt", ".jinja")
TEXT_NAMES = ("COMPLETE",)  # the checkpoint's checksum list (JSON without a suffix)


class ToolInputError(UpgrpoError, ValueError):
    """A path or size given to a tool cannot be used as asked (wrong kind, unreadable, not UTF-8, overlaps)."""


def _real(path) -> Path:
    """Absolute, with every symlink of the existing part resolved (the output may not exist yet)."""
    return Path(os.path.realpath(Path(path).expanduser()))


def _relation(out: Path, inp: Path) -> Optional[str]:
    if out == inp:
        return "is"
    if inp in out.parents:
        return "lies inside"
    if out in inp.parents:
        return "contains"
    return None


def _via_symlinks(out, path, o: Path, i: Path) -> str:
    """How a symlink made two paths overlap, or "" when the paths as given already show it."""
    if (o, i) == (Path(os.path.abspath(out)), Path(os.path.abspath(path))):
        return ""
    return f" (both are {o})" if o == i else f" ({out} is {o}, {path} is {i})"


def refuse_overlap(out, inputs: Sequence[Tuple[str, object]], *, out_flag: str = "--out",
                   allow_inside: Iterable = ()) -> None:
    """Refuse an output directory that is, contains or lies inside any input (after resolving symlinks).

    inputs: (how the user named it, e.g. "--checkpoint" or "RUN_DIR", path). allow_inside: folders of an input
    where output is expected (the report's RUN_DIR/report); an output at or below one of them is accepted."""
    o = _real(out)
    allowed = [_real(a) for a in allow_inside]
    for flag, path in inputs:
        i = _real(path)
        rel = _relation(o, i)
        if rel is None:
            continue
        if rel == "lies inside" and any(i in a.parents and (a == o or a in o.parents) for a in allowed):
            continue
        raise ToolInputError(f"{out_flag} {out} {rel} the input {flag} {path}{_via_symlinks(out, path, o, i)}; "
                             "choose an output directory outside the input (writing there could overwrite or "
                             "delete it)")


def require_dir(path, flag: str, what: str = "directory") -> Path:
    """An existing directory this process can list."""
    p = Path(path)
    if not p.exists():
        raise ToolInputError(f"{flag} {p}: no such {what}")
    if not p.is_dir():
        raise ToolInputError(f"{flag} {p} is {'a file' if p.is_file() else 'not a directory'}, expected a {what}")
    try:
        with os.scandir(p) as it:
            next(it, None)
    except OSError as e:
        raise ToolInputError(f"{flag} {p}: cannot read the {what} ({e.strerror})") from None
    return p


def require_output_dir(path, flag: str = "--out") -> Path:
    """An output directory: absent (its nearest existing ancestor must be a writable directory) or a directory."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ToolInputError(f"{flag} {p} exists and is {'a file' if p.is_file() else 'not a directory'}, "
                             "expected a directory")
    anc = p if p.exists() else next((a for a in p.absolute().parents if a.exists()), Path("/"))
    if not anc.is_dir():
        raise ToolInputError(f"{flag} {p}: {anc} is a file, so the directory cannot be created")
    if not os.access(anc, os.W_OK | os.X_OK):
        raise ToolInputError(f"{flag} {p}: {anc} is not writable")
    return p


def require_positive(value, flag: str):
    """A count or size given on the command line is > 0."""
    if not value > 0:
        raise ToolInputError(f"{flag} {value}: must be greater than 0")
    return value


def read_text(path) -> str:
    """A text file as str: one ToolInputError naming the file (and the line of a non-UTF-8 byte) otherwise."""
    p = Path(path)
    if p.is_dir():
        raise ToolInputError(f"{p} is a directory, expected a file")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise ToolInputError(f"{p}: cannot read it ({e.strerror})") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        bad = f"0x{data[e.start]:02x}"
        raise ToolInputError(f"{p} line {line}: not UTF-8 text (byte {bad}); save it as UTF-8") from None


def _check_parses(p: Path, text: str) -> None:
    if p.suffix == ".json" or p.name in TEXT_NAMES:
        try:
            json.loads(text)
        except json.JSONDecodeError as e:
            raise ToolInputError(f"{p} line {e.lineno}: invalid JSON ({e.msg})") from None
    elif p.suffix in (".yaml", ".yml"):
        import yaml

        try:
            yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" line {mark.line + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or type(e).__name__
            raise ToolInputError(f"{p}{where}: invalid YAML ({what})") from None


def _files(root: Path, recursive: bool):
    if not recursive:
        yield from sorted(f for f in root.iterdir() if not f.is_dir())
        return
    for d, dirs, names in os.walk(root, onerror=_raise_walk_error):
        # hidden folders are what a crash leaves (.step_N.tmp, .step_N.old): the tools skip them, so does this
        dirs[:] = sorted(x for x in dirs if not x.startswith("."))
        yield from (Path(d) / n for n in sorted(names))


def _raise_walk_error(e: OSError) -> None:
    raise ToolInputError(f"{e.filename}: cannot read the directory ({e.strerror})")


def check_input_files(root, flag: str, *, required: Sequence[str] = (), recursive: bool = False) -> None:
    """Every file of an input directory is readable, its text files are UTF-8 and its JSON / YAML parse, and
    each `required` name is a file. Done up front so that a bad input stops the tool before it writes, with
    the file named (the libraries under the tools would fail late, some with a bare traceback)."""
    root = require_dir(root, flag)
    for name in required:
        f = root / name
        if f.is_dir():
            raise ToolInputError(f"{flag} {root}: {f} is a directory, expected a file")
    for f in _files(root, recursive):
        if f.suffix in TEXT_SUFFIXES or f.name in TEXT_NAMES:
            _check_parses(f, read_text(f))
            continue
        try:
            with open(f, "rb"):
                pass
        except OSError as e:
            raise ToolInputError(f"{f}: cannot read it ({e.strerror})") from None
