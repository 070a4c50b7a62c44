"""scan_tar's own header walk reads what ``tarfile`` reads, for every tar layout shards come in.

The shard scanner parses plain ustar/GNU/v7 headers itself (``tarfile`` spent ~70% of an index
build building ``TarInfo`` objects) and hands anything else (pax, GNU long names) to ``tarfile``.
The reference for every case is CPython's ``tarfile`` on the same bytes (``Lib/tarfile.py``:
``TarInfo.frombuf`` / ``calc_chksums`` / ``TarFile.next``); the layouts are those webdataset's
``TarWriter`` (ustar through ``tarfile``, as img2dataset writes) and GNU ``tar cf`` produce.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

from llm2clip_vlm.data.index import DamagedShard, scan_tar


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _expected(path: Path) -> dict[str, tuple[tuple[int, int] | None, dict[str, bytes]]]:
    """What scan_tar must find, from tarfile's own reading."""
    out: dict[str, tuple[tuple[int, int] | None, dict[str, bytes]]] = {}
    with tarfile.open(path) as tar:
        for m in tar:
            if not m.isfile():
                continue
            base, _, name = m.name.rpartition("/")
            stem, _, ext = name.partition(".")
            key = (base + "/" if base else "") + stem
            image, texts = out.setdefault(key, (None, {}))
            if ext == "jpg" and image is None:
                out[key] = ((m.offset_data, m.size), texts)
            elif ext in ("json", "txt"):
                texts[ext] = tar.extractfile(m).read()  # type: ignore[union-attr]
    return out


def _scanned(path: Path) -> dict[str, tuple[tuple[int, int] | None, dict[str, bytes]]]:
    return {r.key: (r.image, r.texts) for r in scan_tar(str(path), ("jpg",))}


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_every_tarfile_format_reads_as_tarfile_reads_it(tmp_path: Path, fmt: int) -> None:
    path = tmp_path / "s.tar"
    deep = "d" * 60 + "/" + "e" * 60  # > 100 characters: ustar's prefix field, GNU's long name
    with tarfile.open(path, "w", format=fmt) as tar:
        dir_info = tarfile.TarInfo("sub")
        dir_info.type = tarfile.DIRTYPE
        tar.addfile(dir_info)
        for i in range(5):
            _add(tar, f"sub/{i:09d}.jpg", bytes([i]) * (100 + 700 * i))
            _add(tar, f"sub/{i:09d}.json", f'{{"caption": "c{i} é"}}'.encode())
        _add(tar, f"{deep}/000000009.jpg", b"x" * 513)
        _add(tar, f"{deep}/000000009.txt", b"long path")
        _add(tar, "empty.jpg", b"")
        _add(tar, "ünï.txt", "名前".encode())
    got = _scanned(path)
    assert got == _expected(path)
    assert f"{deep}/000000009" in got and got["sub/000000004"][0] == _expected(path)["sub/000000004"][0]


@pytest.mark.skipif(shutil.which("tar") is None, reason="no tar command")
def test_gnu_tar_of_nested_folders_reads_as_tarfile_reads_it(tmp_path: Path) -> None:
    src = tmp_path / "src"
    for folder in ("a", "b/c"):
        (src / folder).mkdir(parents=True)
        for i in range(3):
            (src / folder / f"{i:05d}.jpg").write_bytes(bytes([i]) * (300 * i + 1))
            (src / folder / f"{i:05d}.json").write_text(f'{{"caption": "{folder} {i}"}}')
    path = tmp_path / "plain.tar"
    subprocess.run(["tar", "cf", str(path), "-C", str(src), "."], check=True)
    got = _scanned(path)
    assert got == _expected(path) and len(got) == 6


def _shard(path: Path, n: int) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for i in range(n):
            _add(tar, f"{i:09d}.jpg", b"j" * 700)
            _add(tar, f"{i:09d}.json", b"{}")
    return path


def test_a_corrupt_header_and_a_cut_shard_are_named_as_before(tmp_path: Path) -> None:
    whole = _shard(tmp_path / "whole.tar", 4).read_bytes()
    # Member 3's header (the 5th header: 2 blocks per jpg + 2 per json before it) fails its checksum.
    bad = bytearray(whole)
    at = 2 * (512 + 1024) + 2 * (512 + 512)
    bad[at + 10] ^= 0xFF
    (tmp_path / "bad.tar").write_bytes(bytes(bad))
    with pytest.raises(DamagedShard) as e:
        list(scan_tar(str(tmp_path / "bad.tar"), ("jpg",)))
    assert f"a corrupt member header (checksum fails) or stray bytes at byte {at}" in str(e.value)
    # Cut in the middle of a member: the records before it are read, the cut is named.
    (tmp_path / "cut.tar").write_bytes(whole[: at + 512 + 300])
    read = []
    with pytest.raises(DamagedShard, match=r"member '000000002.jpg' is cut off \(300 of 700 bytes\)"):
        for r in scan_tar(str(tmp_path / "cut.tar"), ("jpg",)):
            read.append(r.key)
    assert read == ["000000000", "000000001"]
    # Cut right after a whole member: no end blocks.
    (tmp_path / "end.tar").write_bytes(whole[:at])
    with pytest.raises(DamagedShard, match="no end-of-archive blocks"):
        list(scan_tar(str(tmp_path / "end.tar"), ("jpg",)))
    # Not a tar at all: tarfile's own error, named.
    (tmp_path / "junk.tar").write_bytes(b"junk" * 300)
    with pytest.raises(DamagedShard, match="no readable tar header"):
        list(scan_tar(str(tmp_path / "junk.tar"), ("jpg",)))
