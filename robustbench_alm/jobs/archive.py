"""Safe unpacking of a submission (folder, .zip, .tar, .tar.gz) and its content hash.

Every member is checked before anything is written, and every problem is reported at once:

- no absolute paths, no ``..`` components, no backslashes or NUL bytes in names;
- no device files, FIFOs or sockets;
- a symbolic or hard link must point inside the submission; it is stored as a copy of the
  file it points to (links to links or to folders are refused);
- at most ``max_files`` files and ``max_bytes`` bytes in all, counted from the headers before
  extraction and again while writing (a member that yields more than it declared is refused).

Nothing is extracted with the archive libraries' own ``extractall``: each regular file is
written by this module, exclusively (``open(..., "xb")``), under a folder it has just created.

The submission's identity is :func:`tree_sha256`: a hash over its files' relative paths and
contents, so a folder and an archive of that folder hash the same (the folder holding
``submission.toml`` is the root; an archive whose members all sit in one top folder is
unwrapped to it). Job layer; no torch.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import stat
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SubmissionError", "MAX_BYTES", "MAX_FILES", "unpack", "tree_sha256",
           "METADATA_FILE"]

#: Default cap on the total unpacked size of a submission (bytes).
MAX_BYTES = 4 * 2 ** 30
#: Default cap on the number of files in a submission.
MAX_FILES = 1000
#: The metadata file every submission holds at its root.
METADATA_FILE = "submission.toml"
_CHUNK = 1 << 20


class SubmissionError(ValueError):
    """A submission that cannot be accepted; ``problems`` lists every reason found."""

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"submission {source} refused ({len(self.problems)} "
                         f"problem{'s' if len(self.problems) != 1 else ''}); nothing was "
                         f"queued:\n{lines}")


@dataclass
class _Member:
    """One archive member as this module sees it: a file, a folder, or a link to a file."""

    name: str  # normalized relative POSIX path
    kind: str  # "file", "dir" or "link"
    size: int = 0
    target: str | None = None  # for links: the normalized path it points to
    handle: object = None  # the library's own member object


def _clean_name(raw: str) -> tuple[str | None, str | None]:
    """The normalized relative path of a member, or the reason it is refused."""
    if "\x00" in raw:
        return None, f"{raw!r}: a NUL byte in the name"
    if "\\" in raw:
        return None, f"{raw!r}: a backslash in the name (paths use '/')"
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        return None, f"{raw!r}: an absolute path; expected paths relative to the submission"
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        return None, f"{raw!r}: '..' would escape the submission folder"
    if not parts:
        return None, None  # the archive's own root: nothing to write
    return "/".join(parts), None


def _link_target(name: str, target: str, hard: bool) -> tuple[str | None, str | None]:
    """Where a link points, relative to the submission root, or why it is refused."""
    if target.startswith("/"):
        return None, f"{name!r}: a link to the absolute path {target!r}, outside the submission"
    base = "" if hard else posixpath.dirname(name)
    joined = posixpath.normpath(posixpath.join(base, target))
    if joined == ".." or joined.startswith("../") or joined == ".":
        return None, f"{name!r}: a link to {target!r}, outside the submission"
    return joined, None


def _tar_members(tar: tarfile.TarFile, max_files: int, max_bytes: int,
                 problems: list[str]) -> list[_Member]:
    members, total = [], 0
    while True:
        info = tar.next()
        if info is None:
            break
        if len(members) >= max_files + 1 or total > max_bytes:
            break  # already over a limit: stop reading a possibly endless archive
        name, why = _clean_name(info.name)
        if why:
            problems.append(why)
            continue
        if name is None:
            continue
        if info.isdir():
            members.append(_Member(name, "dir", handle=info))
        elif info.isreg():
            total += info.size
            members.append(_Member(name, "file", info.size, handle=info))
        elif info.issym() or info.islnk():
            target, why = _link_target(name, info.linkname, hard=info.islnk())
            if why:
                problems.append(why)
            else:
                members.append(_Member(name, "link", target=target, handle=info))
        else:
            problems.append(f"{name!r}: a device file, FIFO or other special file; only "
                            "regular files, folders and links inside are accepted")
    return members


def _zip_members(archive: zipfile.ZipFile, problems: list[str]) -> list[_Member]:
    members = []
    for info in archive.infolist():
        name, why = _clean_name(info.filename)
        if why:
            problems.append(why)
            continue
        if name is None:
            continue
        mode = (info.external_attr >> 16) & 0o170000
        if info.is_dir():
            members.append(_Member(name, "dir", handle=info))
        elif mode == stat.S_IFLNK:
            # A zip stores a symbolic link as a small member whose content is the target.
            if info.file_size > 4096:
                problems.append(f"{name!r}: a link whose target is {info.file_size} bytes")
                continue
            target_text = archive.read(info).decode("utf-8", "replace")
            target, why = _link_target(name, target_text, hard=False)
            if why:
                problems.append(why)
            else:
                members.append(_Member(name, "link", target=target, handle=info))
        elif mode in (0, stat.S_IFREG):
            members.append(_Member(name, "file", info.file_size, handle=info))
        else:
            problems.append(f"{name!r}: a device file, FIFO or other special file; only "
                            "regular files, folders and links inside are accepted")
    return members


def _folder_members(root: Path, problems: list[str]) -> list[_Member]:
    members = []
    real_root = root.resolve()
    for folder, dirs, files in os.walk(root, followlinks=False):
        for entry in sorted(dirs) + sorted(files):
            path = Path(folder) / entry
            name = path.relative_to(root).as_posix()
            st = path.lstat()
            if stat.S_ISLNK(st.st_mode):
                resolved = path.resolve()
                if not resolved.is_relative_to(real_root):
                    problems.append(f"{name!r}: a link to {os.readlink(path)!r}, outside the "
                                    "submission")
                else:
                    members.append(_Member(name, "link",
                                           target=resolved.relative_to(real_root).as_posix()))
            elif stat.S_ISDIR(st.st_mode):
                members.append(_Member(name, "dir"))
            elif stat.S_ISREG(st.st_mode):
                members.append(_Member(name, "file", st.st_size, handle=path))
            else:
                problems.append(f"{name!r}: a device file, FIFO or other special file; only "
                                "regular files, folders and links inside are accepted")
    return members


def _check_members(members: list[_Member], max_files: int, max_bytes: int,
                   problems: list[str]) -> None:
    by_name: dict[str, _Member] = {}
    for m in members:
        if m.name in by_name and not (m.kind == by_name[m.name].kind == "dir"):
            problems.append(f"{m.name!r} appears twice in the archive")
        by_name[m.name] = m
    for m in members:
        if m.kind != "link":
            continue
        target = by_name.get(m.target)
        if target is None or target.kind != "file":
            what = "nothing in the submission" if target is None else f"a {target.kind}"
            problems.append(f"{m.name!r}: a link to {m.target!r}, which is {what}; a link "
                            "must point to a regular file of the submission")
        else:
            m.size = target.size
    n_files = sum(m.kind != "dir" for m in members)
    total = sum(m.size for m in members if m.kind != "dir")
    if n_files > max_files:
        problems.append(f"{n_files if n_files <= max_files else 'more than ' + str(max_files)} "
                        f"files; the limit is {max_files} (max_files)")
    if total > max_bytes:
        problems.append(f"{total} bytes unpacked (at least); the limit is {max_bytes} bytes "
                        "(max_bytes)")


def _copy_stream(src, dest: Path, declared: int, budget: list[int], name: str) -> None:
    """Write ``src`` to a new file ``dest``, refusing more bytes than declared or allowed."""
    written = 0
    with open(dest, "xb") as out:
        while chunk := src.read(_CHUNK):
            written += len(chunk)
            budget[0] -= len(chunk)
            if written > declared or budget[0] < 0:
                raise SubmissionError(name, [f"{dest.name!r} holds more bytes than its header "
                                             "declares or the size limit allows"])
            out.write(chunk)


def _ensure_parent(dest_root: Path, name: str) -> Path:
    path = dest_root.joinpath(*name.split("/"))
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def unpack(source: str | Path, dest: str | Path, *, max_bytes: int = MAX_BYTES,
           max_files: int = MAX_FILES) -> Path:
    """Unpack (or copy) the submission ``source`` into the new folder ``dest``.

    Returns:
        The submission's root under ``dest``: the folder holding ``submission.toml`` (``dest``
        itself, or the one folder every member sits in). Without a ``submission.toml`` the
        root is ``dest`` and validation reports the file as missing.

    Raises:
        SubmissionError: listing every unsafe member, or the size or file-count excess; in
            that case nothing is left in ``dest``.
        FileNotFoundError: when ``source`` does not exist.
    """
    source, dest = Path(source), Path(dest)
    if not source.exists():
        raise FileNotFoundError(f"no submission at {str(source)!r}")
    problems: list[str] = []
    name = source.name
    lower = name.lower()
    dest.mkdir(parents=True, exist_ok=False)
    try:
        if source.is_dir():
            members = _folder_members(source, problems)
            _check_members(members, max_files, max_bytes, problems)
            if problems:
                raise SubmissionError(name, problems)
            _write(members, dest, max_bytes, name,
                   lambda m: open(m.handle, "rb"))
        elif lower.endswith(".zip"):
            try:
                archive = zipfile.ZipFile(source)
            except zipfile.BadZipFile as err:
                raise SubmissionError(name, [f"not a readable zip archive: {err}"]) from None
            with archive:
                members = _zip_members(archive, problems)
                _check_members(members, max_files, max_bytes, problems)
                if problems:
                    raise SubmissionError(name, problems)
                _write(members, dest, max_bytes, name, lambda m: archive.open(m.handle))
        elif lower.endswith((".tar", ".tar.gz", ".tgz")):
            try:
                tar = tarfile.open(source, mode="r:*")
            except (tarfile.TarError, OSError) as err:
                raise SubmissionError(name, [f"not a readable tar archive: {err}"]) from None
            with tar:
                try:
                    members = _tar_members(tar, max_files, max_bytes, problems)
                except (tarfile.TarError, OSError, EOFError) as err:
                    raise SubmissionError(name, [f"a damaged tar archive: {err}"]) from None
                _check_members(members, max_files, max_bytes, problems)
                if problems:
                    raise SubmissionError(name, problems)
                _write(members, dest, max_bytes, name, lambda m: tar.extractfile(m.handle))
        else:
            raise SubmissionError(name, [
                "not a folder or a .zip, .tar, .tar.gz or .tgz archive; expected one of those, "
                f"holding {METADATA_FILE} and the weights"])
    except BaseException:
        shutil.rmtree(dest, ignore_errors=True)
        raise
    return _root(dest)


def _write(members: list[_Member], dest: Path, max_bytes: int, name: str, opener) -> None:
    budget = [max_bytes]
    files = {m.name: m for m in members if m.kind == "file"}
    for m in members:
        if m.kind == "dir":
            dest.joinpath(*m.name.split("/")).mkdir(parents=True, exist_ok=True)
    for m in files.values():
        with opener(m) as src:
            _copy_stream(src, _ensure_parent(dest, m.name), m.size, budget, name)
    for m in members:
        if m.kind == "link":
            # A link inside becomes a copy of its target: nothing in the store points anywhere.
            target = dest.joinpath(*m.target.split("/"))
            with open(target, "rb") as src:
                _copy_stream(src, _ensure_parent(dest, m.name), m.size, budget, name)


def _root(dest: Path) -> Path:
    """The folder holding submission.toml: ``dest``, or its only subfolder."""
    if (dest / METADATA_FILE).is_file():
        return dest
    entries = list(dest.iterdir())
    if len(entries) == 1 and entries[0].is_dir() and (entries[0] / METADATA_FILE).is_file():
        return entries[0]
    return dest


def tree_sha256(root: str | Path) -> str:
    """The submission's identity: sha256 over its files' relative paths and contents."""
    root = Path(root)
    digest = hashlib.sha256(b"robustbench-alm submission v1\n")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    for path in files:
        content = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(_CHUNK), b""):
                content.update(chunk)
        rel = path.relative_to(root).as_posix()
        digest.update(f"{rel}\0{path.stat().st_size}\0{content.hexdigest()}\n".encode())
    return digest.hexdigest()
