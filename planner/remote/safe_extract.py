"""Extract a tar stream that came from a machine we do not fully trust (a rented GPU box).

`tarfile.extractall` would follow whatever the archive says: absolute paths, `..`, symlinks to
`/etc`, device nodes. Here every member is checked before anything is written. Strict mode (the
default) stops at the first unsafe member with `UnsafeArchiveError`; given a `skipped` list, unsafe
members are skipped (their data consumed) and reported there, so one bad link does not cost a good
adapter. Every declared size is validated (a negative or non-numeric size is a format error, never a
backwards seek), a member writes exactly its declared size, and `max_bytes` / the free disk space
bound what the whole stream may write.

This is a small streaming reader rather than `tarfile`'s stream mode because it is on the artifact
pull's hot path: file data goes from the SSH channel's chunks straight to disk and to sha256 (one
pass, no intermediate copies), which `tarfile` (several copies per block) made ~20% slower.
Headers are still parsed by `tarfile.TarInfo.frombuf`; GNU long names and PAX path records are
understood, so archives from GNU tar and bsdtar both work.
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

BLOCK = 512
_CHUNK = 1 << 20
_MAX_META = 1 << 20  # a long name or PAX header larger than this is not a real archive
_FREE_MARGIN = 64 << 20  # leave this much free on the local disk


class UnsafeArchiveError(Exception):
    """The archive tried to write outside the destination, or holds a device/fifo."""


class ArchiveFormatError(Exception):
    """The stream is not a complete tar archive (truncated, bad checksum, bad size, unsupported member)."""


class ArchiveTooLargeError(ArchiveFormatError):
    """The stream declares more data than allowed (`max_bytes`) or than the local disk has room for."""


def _clean_name(name: str) -> str:
    """The member name as a safe relative POSIX path, or UnsafeArchiveError."""
    if not name or name.startswith("/") or name.startswith("\\") or (len(name) > 1 and name[1] == ":"):
        raise UnsafeArchiveError(f"absolute path in archive: {name!r}")
    if "\x00" in name:
        raise UnsafeArchiveError(f"NUL byte in archive member name: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(f"'..' in archive member name: {name!r}")
    return "/".join(parts) if parts else "."


def check_member_name(name: str) -> str:
    """Public form of the name check, for callers validating a path before asking for it."""
    clean = _clean_name(name)
    if clean == ".":
        raise UnsafeArchiveError(f"empty path: {name!r}")
    return posixpath.normpath(clean)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


class _Stream:
    """Exact-size reads over a `read(n)` callable that may return short chunks (an SSH channel)."""

    def __init__(self, read: Callable[[int], bytes]):
        self._read = read
        self._buf = b""
        self._pos = 0
        self.announced: int | None = None  # file bytes the sender announced (PAX global `ftplan.size`)

    def _fill(self) -> None:
        data = self._read(_CHUNK)
        if not data:
            raise ArchiveFormatError("archive ended early (truncated stream)")
        self._buf, self._pos = data, 0

    def chunks(self, n: int) -> Iterator[memoryview]:
        """The next `n` bytes as zero-copy views of the received chunks."""
        if n < 0:  # never move backwards: a negative size would re-read the same bytes forever
            raise ArchiveFormatError(f"negative size {n} in archive")
        while n:
            if self._pos >= len(self._buf):
                self._fill()
            take = min(n, len(self._buf) - self._pos)
            yield memoryview(self._buf)[self._pos : self._pos + take]
            self._pos += take
            n -= take

    def exact(self, n: int) -> bytes:
        return b"".join(bytes(c) for c in self.chunks(n))

    def skip(self, n: int) -> None:
        for _ in self.chunks(n):
            pass


def _padding(size: int) -> int:
    return (BLOCK - size % BLOCK) % BLOCK


def _pax_records(data: bytes) -> dict[str, str]:
    """PAX extended header: records of the form '<len> <key>=<value>\\n'."""
    out, pos = {}, 0
    while pos < len(data) and data[pos : pos + 1] not in (b"\x00", b""):
        space = data.find(b" ", pos)
        field = data[pos:space] if space > pos else b""
        if not field.isdigit() or int(field) <= space - pos:
            raise ArchiveFormatError("malformed PAX header (bad record length)")
        length = int(field)
        key, _, value = data[space + 1 : pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


def _size(value: str) -> int:
    if not value.isdigit():  # also refuses "-1536", "1e9", " 12"
        raise ArchiveFormatError(f"PAX size {value[:40]!r} is not a non-negative integer")
    return int(value)


def _members(stream: _Stream) -> Iterator[tarfile.TarInfo]:
    """Headers in order, with GNU long names and PAX records applied; data is left in the stream."""
    long_name = long_link = None
    pax: dict[str, str] = {}
    while True:
        block = stream.exact(BLOCK)
        if block.count(0) == BLOCK:
            return  # end-of-archive marker
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise ArchiveFormatError(f"bad tar header: {exc}") from None
        if info.size < 0:  # GNU base-256 lets a header say -1536
            raise ArchiveFormatError(f"negative size {info.size} in the header of {info.name[:100]!r}")
        if info.type in (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE):
            if info.size > _MAX_META:
                raise ArchiveFormatError(f"tar meta header of {info.size} bytes")
            data = stream.exact(info.size)
            stream.skip(_padding(info.size))
            if info.type == tarfile.GNUTYPE_LONGNAME:
                long_name = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            elif info.type == tarfile.GNUTYPE_LONGLINK:
                long_link = data.split(b"\x00", 1)[0].decode("utf-8", "surrogateescape")
            elif info.type == tarfile.XHDTYPE:
                pax = _pax_records(data)
            elif stream.announced is None and "ftplan.size" in (glob := _pax_records(data)):
                stream.announced = _size(glob["ftplan.size"])  # ftplan's sender: the data that follows
            continue
        if long_name is not None:
            info.name = long_name
        if long_link is not None:
            info.linkname = long_link
        if "path" in pax:
            info.name = pax["path"]
        if "linkpath" in pax:
            info.linkname = pax["linkpath"]
        if "size" in pax:
            info.size = _size(pax["size"])
        long_name = long_link = None
        pax = {}
        yield info


def _make_parent(target: Path, root: str, name: str) -> None:
    """Create the directories `target` lands in, one at a time, each checked to resolve inside root
    BEFORE anything is created under it (a link planted by an earlier member could point out)."""
    cur = root
    for part in Path(name).parent.parts:
        cur = os.path.join(cur, part)
        if os.path.islink(cur) or os.path.exists(cur):
            real = os.path.realpath(cur)
            if not _inside(real, root):
                raise UnsafeArchiveError(f"{name!r} would be written through a link that leaves the destination")
            if not os.path.isdir(real):
                raise UnsafeArchiveError(f"{name!r} would be written below a non-directory {part!r}")
        else:
            os.mkdir(cur)
    if not _inside(os.path.realpath(target.parent), root):
        raise UnsafeArchiveError(f"{name!r} would be written through a link that leaves the destination")


def _remove_existing(target: Path) -> None:
    if target.is_symlink() or target.is_file():
        target.unlink()


def _links_leaving(root: str) -> list[str]:
    """Symlinks under root that resolve outside it now (a later member can re-point an earlier link)."""
    bad = []
    for d, dirs, files in os.walk(root):
        for entry in dirs + files:
            path = os.path.join(d, entry)
            if os.path.islink(path) and not _inside(os.path.realpath(path), root):
                bad.append(path)
    return bad


class _Budget:
    """What the stream may still write: `max_bytes` in all, and never the last of the local disk."""

    def __init__(self, root: str, max_bytes: int | None):
        self.root, self.left = root, max_bytes

    def announce(self, size: int, slack: int | None) -> None:
        """The sender announced `size` bytes of files: refuse at once if the disk cannot hold them, and
        stop the stream once it sends more than that (plus `slack` for files growing as they are read)."""
        free = shutil.disk_usage(self.root).free
        if size > free - _FREE_MARGIN:
            raise ArchiveTooLargeError(
                f"the stream announces {size / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free on the local disk"
            )
        cap = size + (max(size // 4, 16 << 20) if slack is None else slack)
        self.left = cap if self.left is None else min(self.left, cap)

    def take(self, name: str, size: int) -> None:
        if self.left is not None:
            if size > self.left:
                raise ArchiveTooLargeError(
                    f"{name!r} declares {size} bytes, more than the {self.left} left of what the stream announced"
                )
            self.left -= size
        free = shutil.disk_usage(self.root).free
        if size > free - _FREE_MARGIN:
            raise ArchiveTooLargeError(
                f"{name!r} declares {size / 2**30:.2f} GiB but only {free / 2**30:.2f} GiB is free on the local disk"
            )


def safe_extract(
    read: Callable[[int], bytes],
    dest: Path,
    *,
    skipped: list[tuple[str, str]] | None = None,
    max_bytes: int | None = None,
    growth_slack: int | None = None,
) -> dict[str, str]:
    """Extract the tar stream given by `read(n)` (e.g. `fileobj.read`, `channel.recv`) into `dest`.

    Returns {relative path: sha256 hex} of regular files (a hard link counts as the file it links
    to). Unsafe members (absolute names, `..`, symlinks and hard links resolving outside `dest`,
    devices, fifos, other special members) raise UnsafeArchiveError, or, when `skipped` is a list,
    are left out and appended to it as (name, reason). Permission bits are reduced to rw-r--r-- plus
    execute bits. Stops at the end-of-archive marker; the caller drains whatever follows. A PAX global
    header `ftplan.size` (ftplan's sender) announces the file bytes: checked against the free disk at
    once, and the stream may then write at most that plus `growth_slack` (default a quarter, at least 16 MiB:
    files the job is still writing may grow while read).
    """
    dest.mkdir(parents=True, exist_ok=True)
    root = os.path.realpath(dest)
    stream = _Stream(read)
    budget = _Budget(root, max_bytes)
    hashes: dict[str, str] = {}
    applied = False
    for member in _members(stream):
        if stream.announced is not None and not applied:
            applied = True
            budget.announce(stream.announced, growth_slack)
        try:
            _extract_member(member, stream, root, hashes, budget)
        except _Skip as exc:
            stream.skip(exc.left + _padding(exc.left))
            if skipped is None:
                raise exc.error from None
            skipped.append((member.name, str(exc.error)))
    for path in _links_leaving(root):
        rel = os.path.relpath(path, root)
        if skipped is None:
            raise UnsafeArchiveError(f"symlink {rel!r} points outside the destination")
        os.unlink(path)
        skipped.append((rel, "symlink points outside the destination"))
    return hashes


class _Skip(Exception):
    """An unsafe member: `left` bytes of its data are still in the stream."""

    def __init__(self, error: UnsafeArchiveError, left: int):
        self.error, self.left = error, left


def _extract_member(member: tarfile.TarInfo, stream: _Stream, root: str, hashes: dict[str, str],
                    budget: _Budget) -> None:
    try:
        name = _clean_name(member.name)
        target = Path(root, name)
        if member.isdir():
            if name != ".":
                _make_parent(target, root, name)
                if target.is_symlink():
                    raise UnsafeArchiveError(f"directory {name!r} collides with a link in the archive")
                target.mkdir(exist_ok=True)
        elif name == ".":
            raise UnsafeArchiveError("archive member replaces the destination itself")
        elif member.isreg() and member.type != tarfile.GNUTYPE_SPARSE:
            _make_parent(target, root, name)
            budget.take(name, member.size)
            _remove_existing(target)
        elif member.issym():
            link = member.linkname
            if link.startswith("/"):
                raise UnsafeArchiveError(f"symlink {name!r} -> {link!r} is absolute")
            _make_parent(target, root, name)
            resolved = os.path.realpath(os.path.join(os.path.dirname(target), link))
            if not _inside(resolved, root):
                raise UnsafeArchiveError(f"symlink {name!r} -> {link!r} points outside the destination")
            _remove_existing(target)
            os.symlink(link, target)
        elif member.islnk():
            link_name = _clean_name(member.linkname)
            source = Path(root, link_name)
            if not _inside(os.path.realpath(source), root) or source.is_symlink() or not source.is_file():
                raise UnsafeArchiveError(f"hard link {name!r} -> {member.linkname!r} points outside the archive")
            _make_parent(target, root, name)
            _remove_existing(target)
            os.link(source, target)
            if link_name in hashes:
                hashes[name] = hashes[link_name]
        elif member.ischr() or member.isblk():
            raise UnsafeArchiveError(f"device {name!r} in archive is not allowed")
        elif member.isfifo():
            raise UnsafeArchiveError(f"fifo {name!r} in archive is not allowed")
        else:
            raise UnsafeArchiveError(f"special member {name!r} (tar type {member.type!r}) is not allowed")
    except UnsafeArchiveError as exc:
        raise _Skip(exc, member.size) from None
    if member.isreg() and member.type != tarfile.GNUTYPE_SPARSE:
        digest = hashlib.sha256()
        with open(target, "wb") as out:
            for view in stream.chunks(member.size):  # exactly the declared size, never more
                digest.update(view)
                out.write(view)
        stream.skip(_padding(member.size))
        os.chmod(target, 0o644 | (member.mode & 0o111))
        hashes[name] = digest.hexdigest()
    else:
        stream.skip(member.size + _padding(member.size))
