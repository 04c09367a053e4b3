import struct

import pytest
from hypothesis import given, strategies as st

from overlayfs_inetsk.core import imagefile
from overlayfs_inetsk.errors import ImageError

from inetsk_testbed.imagefactory import files_img, inet_file_entry, isk, reg_file_entry


def test_parse_splits_entries_and_keeps_bytes():
    a, b = reg_file_entry(1), inet_file_entry(isk(2, "10.0.0.1", 80))
    data = files_img(a, b)
    img = imagefile.parse(data, "files.img", imagefile.FILES_MAGIC)
    assert [e.payload for e in img.entries] == [a, b]
    assert img.entries[0].offset == 8
    assert img.entries[1].offset == 8 + 4 + len(a)
    assert imagefile.encode(img.magic, (e.payload for e in img.entries)) == data


@given(st.lists(st.binary(max_size=300), max_size=30))
def test_encode_parse_identity(payloads):
    data = imagefile.encode(imagefile.FILES_MAGIC, payloads)
    img = imagefile.parse(data, "f", imagefile.FILES_MAGIC)
    assert [e.payload for e in img.entries] == payloads
    assert imagefile.encode(img.magic, [e.payload for e in img.entries]) == data


@pytest.mark.parametrize(
    "data, fragment",
    [
        (b"", "empty file"),
        (b"\x19\x43", "shorter than the 8-byte"),
        (struct.pack("<II", 0xDEADBEEF, imagefile.FILES_MAGIC), "not a CRIU image"),
        (struct.pack("<II", imagefile.IMG_COMMON, 0x12345678), "wrong image type"),
        (files_img(b"abc") + b"\x01\x02", "2 trailing bytes"),
        (files_img(b"abcdef")[:-2], "runs past the end"),
        (struct.pack("<III", imagefile.IMG_COMMON, imagefile.FILES_MAGIC, 0xFFFFFFFF),
         "entry length 4294967295"),
    ],
)
def test_malformed_images_name_file_and_problem(data, fragment):
    with pytest.raises(ImageError) as ei:
        imagefile.parse(data, "/x/files.img", imagefile.FILES_MAGIC)
    assert fragment in str(ei.value)
    assert str(ei.value).startswith("/x/files.img")


def test_truncated_entry_reports_offset():
    data = files_img(b"abc", b"defgh")[:-1]
    with pytest.raises(ImageError) as ei:
        imagefile.parse(data, "files.img", imagefile.FILES_MAGIC)
    assert ei.value.offset == 8 + 4 + 3
    assert "entry at offset 15" in str(ei.value)


def test_magics_are_pycriu_s() -> None:
    """The codec keeps its magics as literals (importing pycriu.images loads all of pycriu):
    they must be the ones pycriu defines."""
    from pycriu.images import magic

    assert imagefile.IMG_COMMON == magic.by_name["IMG_COMMON"]
    assert imagefile.FILES_MAGIC == magic.by_name["FILES"]
    assert imagefile.INETSK_MAGIC == magic.by_name["INETSK"]


# -- the testbed's check of every test dump: decode and re-encode each entry with pycriu's
#    classes (as CRIU's test/crit-recode.py does), not only split and join the frames
def test_recode_check_passes_canonical_images(tmp_path):
    from inetsk_testbed import criu as tb_criu
    from inetsk_testbed.imagefactory import inetsk_img

    (tmp_path / "files.img").write_bytes(files_img(
        reg_file_entry(1), inet_file_entry(isk(2, "10.0.0.1", 80)),
        inet_file_entry(isk(3, "fd00::1", 53, proto="udp"))))
    (tmp_path / "inetsk.img").write_bytes(inetsk_img(isk(4, "10.0.0.2", 81)))
    tb_criu.check_codec_identity(tmp_path)


@pytest.mark.parametrize("payload", [
    inet_file_entry(isk(2, "10.0.0.1", 80)) + b"\x08\x04",  # `type` again (last one wins)
    b"\x10\x02\x08\x04",  # id before type: valid, but not how protobuf writes it
    b"\x08\x04\x10",  # truncated: not a file_entry at all
])
def test_recode_check_catches_what_splitting_frames_cannot(tmp_path, payload):
    from inetsk_testbed import criu as tb_criu

    (tmp_path / "files.img").write_bytes(files_img(reg_file_entry(1), payload))
    with pytest.raises(AssertionError, match=r"files\.img: entry 1 at offset \d+"):
        tb_criu.check_codec_identity(tmp_path)
