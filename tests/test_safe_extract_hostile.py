"""Hostile tar streams, crafted byte by byte, against safe_extract (issue 11 items 2, 8, 9, 10).

Each stream is what a compromised or broken machine could send as an artifact: a negative size that
moves the read position backwards (an endless loop before), a non-numeric PAX size, a member that
declares a terabyte, links that plant a way out of the destination before a directory is created."""

from __future__ import annotations

import io
import tarfile
import threading
from pathlib import Path

import pytest

from ftplan.planner.remote.safe_extract import (
    ArchiveFormatError,
    ArchiveTooLargeError,
    UnsafeArchiveError,
    safe_extract,
)


def header(name: str, *, size: int = 0, kind: bytes = tarfile.REGTYPE, link: str = "") -> bytearray:
    info = tarfile.TarInfo(name)
    info.size, info.type, info.linkname, info.mode = size, kind, link, 0o644
    return bytearray(info.tobuf(tarfile.GNU_FORMAT))  # GNU: sizes past 8 GiB in base-256


def with_size_field(block: bytearray, field: bytes) -> bytes:
    """Overwrite the 12-byte size field and fix the header checksum (a valid header with a bad size)."""
    block[124:136] = field
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\x00 " % sum(block)
    return bytes(block)


def base256(value: int) -> bytes:
    """GNU base-256 encoding of a (negative) number in a 12-byte field."""
    return b"\xff" + (value & (2**88 - 1)).to_bytes(11, "big")


def pax(records: dict[str, str], name: str = "pax", kind: bytes = tarfile.XHDTYPE) -> bytes:
    body = b""
    for key, value in records.items():
        rec = f" {key}={value}\n".encode()
        n = len(rec) + 1
        while len(str(n).encode()) + len(rec) != n:
            n += 1
        body += str(n).encode() + rec
    return bytes(header(name, size=len(body), kind=kind)) + body + bytes(-len(body) % 512)


def file_member(name: str, data: bytes) -> bytes:
    return bytes(header(name, size=len(data))) + data + bytes(-len(data) % 512)


END = bytes(1024)


def extract_bounded(stream: bytes, dest: Path, **kw) -> BaseException | dict:
    """Run safe_extract in a thread; a looping extractor fails the test instead of hanging it."""
    result: list = []

    def work() -> None:
        try:
            result.append(safe_extract(io.BytesIO(stream).read, dest, **kw))
        except BaseException as exc:  # noqa: BLE001
            result.append(exc)

    t = threading.Thread(target=work, daemon=True)
    t.start()
    t.join(60)
    assert not t.is_alive(), "safe_extract is still looping on the stream"
    return result[0]


def test_negative_base256_size_is_a_clean_format_error(tmp_path):
    good = file_member("a.txt", b"hello")
    evil = with_size_field(header("b.bin"), base256(-1536))
    got = extract_bounded(good + evil + END, tmp_path / "d")
    assert isinstance(got, ArchiveFormatError) and "negative size" in str(got)


@pytest.mark.parametrize("value", ["-1536", "abc", "1e9", ""])
def test_pax_size_that_is_not_a_natural_number_is_a_clean_format_error(tmp_path, value):
    stream = pax({"size": value}) + file_member("a.txt", b"hello") + END
    got = extract_bounded(stream, tmp_path / "d")
    assert isinstance(got, ArchiveFormatError), repr(got)
    assert "PAX size" in str(got)


def test_malformed_pax_record_length_is_a_clean_format_error(tmp_path):
    body = b"xx path=a\n"
    stream = bytes(header("p", size=len(body), kind=tarfile.XHDTYPE)) + body + bytes(-len(body) % 512) + END
    got = extract_bounded(stream, tmp_path / "d")
    assert isinstance(got, ArchiveFormatError) and "PAX" in str(got)


def test_a_member_declaring_a_terabyte_is_stopped_before_writing(tmp_path):
    stream = bytes(header("huge.bin", size=2**40)) + b"x" * 4096
    got = extract_bounded(stream, tmp_path / "d")
    assert isinstance(got, ArchiveTooLargeError) and "free on the local disk" in str(got)
    assert not (tmp_path / "d" / "huge.bin").exists()


def test_the_stream_stops_at_the_size_it_announced(tmp_path):
    stream = file_member("a.bin", b"a" * 3000) + file_member("b.bin", b"b" * 3000) + END
    got = extract_bounded(stream, tmp_path / "d", max_bytes=4000)
    assert isinstance(got, ArchiveTooLargeError) and "announced" in str(got)
    assert not (tmp_path / "d" / "b.bin").exists()


def test_no_directory_is_created_outside_through_a_repointed_link(tmp_path):
    """`b -> x/y` makes `a -> b/../..` look inside; re-pointing `b` then makes `a` lead out. A later
    `a/newdir/f` used to create `newdir` outside the destination before the realpath check refused it."""
    dest = tmp_path / "box" / "d"
    stream = (
        bytes(header("x", kind=tarfile.DIRTYPE)) + bytes(header("x/y", kind=tarfile.DIRTYPE))
        + bytes(header("b", kind=tarfile.SYMTYPE, link="x/y"))
        + bytes(header("a", kind=tarfile.SYMTYPE, link="b/../.."))
        + bytes(header("b", kind=tarfile.SYMTYPE, link="z"))
        + file_member("a/newdir/f", b"escaped") + END
    )
    got = extract_bounded(stream, dest)
    assert isinstance(got, UnsafeArchiveError)
    assert not (tmp_path / "box" / "newdir").exists()
    skipped: list = []
    got = extract_bounded(stream, tmp_path / "box2" / "d", skipped=skipped)
    assert not (tmp_path / "box2" / "newdir").exists()
    assert not (tmp_path / "box2" / "d" / "a").is_symlink()  # the link that now leads out is removed
    assert {name for name, _ in skipped} >= {"a/newdir/f", "a"}


def test_unsafe_members_are_skipped_and_reported_while_safe_files_are_kept(tmp_path):
    stream = (
        file_member("adapter/weights.bin", b"w" * 1000)
        + bytes(header("adapter/passwd", kind=tarfile.SYMTYPE, link="/etc/passwd"))
        + bytes(header("adapter/up", kind=tarfile.SYMTYPE, link="../../.."))
        + file_member("../evil.txt", b"e")
        + bytes(header("adapter/dev", kind=tarfile.CHRTYPE))
        + file_member("adapter/config.json", b"{}")
        + END
    )
    skipped: list = []
    got = extract_bounded(stream, tmp_path / "d", skipped=skipped)
    assert sorted(got) == ["adapter/config.json", "adapter/weights.bin"]
    assert (tmp_path / "d" / "adapter" / "weights.bin").read_bytes() == b"w" * 1000
    assert [n for n, _ in skipped] == ["adapter/passwd", "adapter/up", "../evil.txt", "adapter/dev"]
    assert not (tmp_path / "evil.txt").exists()
    strict = extract_bounded(stream, tmp_path / "strict")
    assert isinstance(strict, UnsafeArchiveError)
