"""services.images: magic-byte sniffing and header sizes, checked against images Pillow writes."""

from __future__ import annotations

import base64
import io
import json
import os
from pathlib import Path

import pytest
from PIL import Image

from services.errors import ResponseError
from services.images import ImageInfo, inspect_image, sniff_mime

SIZES = [(1, 1), (3, 7), (17, 9), (333, 127), (1025, 3)]


def encode(size: tuple[int, int], mode: str, fmt: str, **options: object) -> bytes:
    """An image of ``size`` written by Pillow, with a gradient so encoders cannot take shortcuts."""
    gradient = Image.linear_gradient("L").resize(size)
    image = gradient.convert(mode)
    if mode == "RGBA":  # real transparency, so WebP keeps an alpha chunk (VP8X)
        image.putalpha(gradient)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


# (id, mode, Pillow format, save options, expected mime, expected extension)
VARIANTS = [
    ("png-rgb", "RGB", "PNG", {}, "image/png", "png"),
    ("png-rgba", "RGBA", "PNG", {}, "image/png", "png"),
    ("png-palette", "P", "PNG", {}, "image/png", "png"),
    ("png-16bit", "I;16", "PNG", {}, "image/png", "png"),
    ("jpeg-baseline", "RGB", "JPEG", {}, "image/jpeg", "jpg"),
    ("jpeg-progressive", "RGB", "JPEG", {"progressive": True}, "image/jpeg", "jpg"),
    ("jpeg-grey", "L", "JPEG", {"quality": 95}, "image/jpeg", "jpg"),
    ("webp-lossy", "RGB", "WEBP", {}, "image/webp", "webp"),
    ("webp-lossy-alpha", "RGBA", "WEBP", {}, "image/webp", "webp"),
    ("webp-lossless", "RGB", "WEBP", {"lossless": True}, "image/webp", "webp"),
    ("gif", "P", "GIF", {}, "image/gif", "gif"),
]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize(
    ("mode", "fmt", "options", "mime", "ext"), [v[1:] for v in VARIANTS], ids=[v[0] for v in VARIANTS]
)
def test_inspect_reads_type_and_size(
    size: tuple[int, int], mode: str, fmt: str, options: dict, mime: str, ext: str
) -> None:
    data = encode(size, mode, fmt, **options)
    assert sniff_mime(data) == mime
    assert inspect_image(data) == ImageInfo(mime_type=mime, extension=ext, width=size[0], height=size[1])


@pytest.mark.parametrize(
    ("mode", "options", "chunk"),
    [("RGB", {}, b"VP8 "), ("RGB", {"lossless": True}, b"VP8L"), ("RGBA", {}, b"VP8X")],
)
def test_webp_variants_are_all_covered(mode: str, options: dict, chunk: bytes) -> None:
    assert encode((5, 3), mode, "WEBP", **options)[12:16] == chunk


def test_webp_extended_canvas_larger_than_vp8_limit() -> None:
    # VP8X sizes are 24-bit: a canvas wider than the 14-bit VP8/VP8L fields can say.
    header = b"RIFF\x00\x00\x00\x00WEBPVP8X\x0a\x00\x00\x00\x10\x00\x00\x00"
    data = header + (20000 - 1).to_bytes(3, "little") + (7 - 1).to_bytes(3, "little")
    assert inspect_image(data) == ImageInfo("image/webp", "webp", 20000, 7)


def test_jpeg_progressive_uses_sof2() -> None:
    data = encode((40, 30), "RGB", "JPEG", progressive=True)
    assert b"\xff\xc2" in data and b"\xff\xc0" not in data


def test_jpeg_walks_past_large_exif_and_icc_segments() -> None:
    image = Image.linear_gradient("L").resize((321, 123)).convert("RGB")
    exif = Image.Exif()
    exif[0x010E] = "x" * 5000  # ImageDescription: a big APP1 segment
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif, icc_profile=b"\0" * 3000)
    assert inspect_image(buffer.getvalue()).width == 321
    assert inspect_image(buffer.getvalue()).height == 123


def test_jpeg_fill_bytes_and_standalone_markers() -> None:
    data = encode((71, 13), "RGB", "JPEG")
    # SOI, then a TEM and an RST0 marker, then fill bytes before the next real marker.
    tweaked = data[:2] + b"\xff\x01\xff\xd0" + b"\xff\xff\xff" + data[2:]
    assert (inspect_image(tweaked).width, inspect_image(tweaked).height) == (71, 13)


@pytest.mark.parametrize(
    ("mode", "fmt", "options", "header_end"),
    [
        ("RGB", "PNG", {}, 24),
        ("P", "GIF", {}, 10),
        ("RGB", "WEBP", {}, 30),
        ("RGB", "WEBP", {"lossless": True}, 25),
        ("RGBA", "WEBP", {}, 30),
        ("RGB", "JPEG", {}, None),
        ("RGB", "JPEG", {"progressive": True}, None),
    ],
)
def test_every_prefix_shorter_than_the_header_raises(
    mode: str, fmt: str, options: dict, header_end: int | None
) -> None:
    data = encode((257, 65), mode, fmt, **options)
    needed = next(n for n in range(len(data) + 1) if _reads(data[:n]))
    if header_end is None:  # JPEG: the header ends with the width field of the SOFn segment
        assert data[needed - 9] == 0xFF and data[needed - 8] in (0xC0, 0xC2)
    else:
        assert needed == header_end
    for n in range(needed):
        with pytest.raises(ResponseError) as caught:
            inspect_image(data[:n])
        assert caught.value.code == "bad_upstream_response"


def _reads(data: bytes) -> bool:
    try:
        return inspect_image(data).width == 257
    except ResponseError:
        return False


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"hello world, not an image",
        b"<html><body>502 Bad Gateway</body></html>",
        b'{"error": {"code": 500}}',
        b"\x00" * 64,
        b"BM" + b"\x00" * 60,  # BMP is not supported
        b"RIFF\x00\x00\x00\x00WAVEfmt ",
    ],
)
def test_unknown_bytes_raise(data: bytes) -> None:
    assert sniff_mime(data) is None
    with pytest.raises(ResponseError) as caught:
        inspect_image(data)
    assert caught.value.code == "bad_upstream_response"
    assert data[:16].hex() in caught.value.message


@pytest.mark.parametrize(
    "data",
    [
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x04tEXtabcd" + b"\x00" * 16,  # first chunk not IHDR
        b"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR" + b"\x00" * 13,  # 0x0 size
        b"\xff\xd8\xff\xd9",  # EOI before any frame
        b"\xff\xd8\xff\xda\x00\x08" + b"\x00" * 16,  # scan before any frame
        b"\xff\xd8\xff\xe0\x00\x01" + b"\x00" * 16,  # segment length < 2
        b"\xff\xd8\xff\x00" + b"\x00" * 16,  # 0xFF 0x00 is not a marker
        b"\xff\xd8\xff\xe0\x00\x04ab" + b"garbage" * 4,  # no marker after a segment
        b"RIFF\x00\x00\x00\x00WEBPVP8 \x00\x00\x00\x00" + b"\x00" * 16,  # no VP8 start code
        b"RIFF\x00\x00\x00\x00WEBPVP8L\x00\x00\x00\x00" + b"\x00" * 16,  # no VP8L signature
        b"RIFF\x00\x00\x00\x00WEBPABCD\x00\x00\x00\x00" + b"\x00" * 16,  # unknown chunk
    ],
)
def test_corrupt_headers_raise(data: bytes) -> None:
    assert sniff_mime(data) is not None
    with pytest.raises(ResponseError) as caught:
        inspect_image(data)
    assert caught.value.code == "bad_upstream_response"


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = b"ftyp" + major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (len(body) + 4).to_bytes(4, "big") + body + b"\x00\x00\x00\x08meta"


@pytest.mark.parametrize(
    ("data", "mime", "ext"),
    [
        (_ftyp(b"heic", b"mif1", b"heic"), "image/heic", "heic"),
        (_ftyp(b"heix", b"mif1"), "image/heic", "heic"),
        (_ftyp(b"mif1", b"mif1", b"heic"), "image/heic", "heic"),
        (_ftyp(b"msf1", b"msf1", b"hevc"), "image/heic", "heic"),
        (_ftyp(b"mif1", b"mif1", b"miaf"), "image/heif", "heif"),
        (_ftyp(b"msf1", b"iso8"), "image/heif", "heif"),
    ],
)
def test_heic_and_heif_from_ftyp_brands(data: bytes, mime: str, ext: str) -> None:
    assert sniff_mime(data) == mime
    assert inspect_image(data) == ImageInfo(mime, ext, None, None)


@pytest.mark.parametrize(
    "data",
    [
        _ftyp(b"isom", b"isom", b"mp41"),  # an MP4 video
        _ftyp(b"avif", b"mif1", b"miaf"),  # AVIF is HEIF-based but not supported
        b"\x00\x00\x00\x08ftypheic",  # box too short to hold a major brand and version
    ],
)
def test_other_ftyp_files_are_unknown(data: bytes) -> None:
    assert sniff_mime(data) is None


def test_real_avif_is_unknown() -> None:
    assert sniff_mime(encode((9, 9), "RGB", "AVIF")) is None


def test_mislabelled_bytes_are_sniffed_by_content() -> None:
    jpeg = encode((8, 8), "RGB", "JPEG")
    assert sniff_mime(jpeg) == "image/jpeg"
    assert inspect_image(jpeg).extension == "jpg"


def test_client_inline_images_of_the_request_sample() -> None:
    shared = Path(os.environ.get("IMAGEGEN_SHARED_DIR", Path(__file__).parents[2] / "shared"))
    request = json.loads((shared / "upstream/samples/request-seed-example.json").read_bytes())
    parts = [p for p in request["contents"][0]["parts"] if "inline_data" in p]
    assert parts
    for part in parts:
        data = base64.b64decode(part["inline_data"]["data"])
        assert sniff_mime(data) == part["inline_data"]["mime_type"]
        assert inspect_image(data) == ImageInfo("image/png", "png", 16, 16)
