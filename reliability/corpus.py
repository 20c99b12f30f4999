"""A deterministic corpus of malformed image files, made with Pillow.

Seeds: a small odd-sized image (17x13, so strides do not line up) saved in every
format Pillow can write, in every mode each format takes (one mode for formats the
server does not accept), plus compression, interlacing and animation variants of
the six formats the server accepts, plus hand-built files of formats Pillow can open
but not write (their magic numbers and minimal headers). From every seed:

* **truncations** at fixed byte counts and fractions;
* **mutations**: seeded bit flips, overwritten runs, inserted, deleted and
  duplicated blocks, trailing garbage, the header alone;
* **bad headers**, per format: every field of the PNG IHDR at its edge values (CRC
  fixed and not), broken chunk lengths, a zTXt text bomb; every TIFF IFD entry with
  every field type (the StripOffsets-as-ASCII case of issue 12), absurd counts and
  offsets, a self-referencing IFD; GIF screen and frame sizes, LZW code sizes; BMP
  sizes, planes, bit depths, compressions and offsets; JPEG frame sizes, components
  and precisions; WEBP RIFF sizes and frame sizes;
* **decompression bombs**: headers claiming up to 2^32-1 pixels a side, and a real
  25-megapixel PNG of zeros that compresses to a few kilobytes.

:func:`build` returns the same list for the same seed, so a failure names a file
that can be written out (``python -m reliability.fuzz --write-corpus DIR``) and
replayed.
"""

from __future__ import annotations

import functools
import io
import random
import struct
import time
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from server.matching.imaging import FORMATS as ACCEPTED

MODES = ("L", "RGB", "RGBA", "P", "1", "LA", "I;16", "CMYK", "F", "I")
FIXED_DATE = time.strptime("2026-01-01", "%Y-%m-%d")  # Pillow's PDF writer takes struct_time
TIFF_COMPRESSIONS = ("raw", "tiff_lzw", "packbits", "tiff_deflate", "tiff_adobe_deflate", "jpeg")


@dataclass(frozen=True)
class Sample:
    """One corpus file: ``source`` is the seed's format, ``kind`` how it was made."""

    name: str
    data: bytes
    source: str
    kind: str  # seed | truncated | mutated | header | bomb


def base_image(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    ramp = np.add.outer(np.arange(13), np.arange(17)) * 7
    pixels = (ramp[..., None] + rng.integers(0, 40, (13, 17, 3))).astype(np.uint8)
    return Image.fromarray(pixels, "RGB")


def _as_mode(image: Image.Image, mode: str) -> Image.Image:
    if mode == "I;16":
        wide = np.asarray(image.convert("L"), np.uint16) * 257
        return Image.fromarray(wide)
    return image.convert(mode)


def _save(image: Image.Image, fmt: str, **options) -> bytes | None:
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # e.g. the IM format
            image.save(buffer, format=fmt, **options)
    except Exception:  # this format does not take this mode/option: no seed
        return None
    return buffer.getvalue()


def writable_seeds(seed: int = 0) -> list[Sample]:
    """Every format Pillow can write; every mode for the accepted formats."""
    Image.init()
    image = base_image(seed)
    out = []
    fixed = {"PDF": {"creationDate": FIXED_DATE, "modDate": FIXED_DATE}}  # no timestamps
    for fmt in sorted(Image.SAVE):
        made = []
        for mode in MODES:
            data = _save(_as_mode(image, mode), fmt, **fixed.get(fmt, {}))
            if data is not None and len(data) < 64 << 10:
                made.append(Sample(f"{fmt}-{mode}", data, fmt, "seed"))
        out += made if fmt in ACCEPTED else made[:1]
    out += _variants(image)
    return out


def _variants(image: Image.Image) -> list[Sample]:
    """Code paths of the accepted formats that one save per mode does not reach."""
    grey = image.convert("L")
    frames = [image.rotate(90 * i) for i in range(3)]
    options = [("PNG", "interlaced", image, {"interlace": 1})]  # Pillow writes Adam7? no-op
    options += [("JPEG", "progressive", image, {"progressive": True, "quality": 50})]
    options += [("JPEG", "subsampled", image, {"subsampling": 2, "optimize": True})]
    options += [("TIFF", c, grey, {"compression": c}) for c in TIFF_COMPRESSIONS]
    options += [("TIFF", "multipage", image, {"save_all": True, "append_images": frames})]
    options += [("GIF", "animated", image, {"save_all": True, "append_images": frames})]
    options += [("GIF", "transparent", image.convert("P"), {"transparency": 0})]
    options += [("WEBP", "lossless", image, {"lossless": True})]
    options += [("WEBP", "animated", image, {"save_all": True, "append_images": frames})]
    options += [("BMP", "1bit", image.convert("1"), {})]
    out = []
    for fmt, name, img, kw in options:
        data = _save(img, fmt, **kw)
        if data is not None:
            out.append(Sample(f"{fmt}-{name}", data, fmt, "seed"))
    return out


def open_only_seeds() -> list[Sample]:
    """Formats Pillow opens but cannot write: minimal files by hand (magic + header)."""
    pixels = np.asarray(base_image().convert("L"))
    h, w = pixels.shape
    raw = pixels.tobytes()
    fits_cards = ["SIMPLE  =                    T", "BITPIX  =                    8",
                  "NAXIS   =                    2", f"NAXIS1  = {w:20d}",
                  f"NAXIS2  = {h:20d}", "END"]  # fmt: skip
    fits = "".join(c.ljust(80) for c in fits_cards).ljust(2880).encode() + raw.ljust(2880, b"\0")
    ico = _save(base_image(), "ICO") or b""
    pcx = _save(base_image().convert("L"), "PCX") or b""
    xpm = (
        b'/* XPM */\nstatic char *x[] = {\n"4 2 2 1",\n"a c #000000",\n"b c #FFFFFF",\n'
        b'"abab",\n"baba"\n};\n'
    )
    sun = struct.pack(">8I", 0x59A66A95, w, h, 8, len(raw), 1, 0, 0) + raw
    gbr = struct.pack(">5I4sI", 28 + 5, 2, w, h, 1, b"GIMP", 10) + b"seed\0" + raw
    psd = b"8BPS" + struct.pack(">H6xHIIHH", 1, 1, h, w, 8, 1) + b"\0" * 12 + raw
    seeds = {
        "CUR": ico[:2] + b"\x02\x00" + ico[4:],  # an ICO whose type says cursor
        "DCX": struct.pack("<II", 0x3ADE68B1, 12) + b"\0" * 4 + pcx,
        "FITS": fits,
        "XPM": xpm,
        "SUN": sun,
        "GBR": gbr,
        "PSD": psd,
        "XVTHUMB": f"P7 332\n#END_OF_COMMENTS\n{w} {h} 255\n".encode() + raw,
        "PIXAR": b"\x80\xe8\x00\x00" + b"\0" * 508,
        "MCIDAS": struct.pack(">8I", 0, 4, 0, 0, 0, 0, 0, 0) + b"\0" * 1024,
        "FLI": struct.pack("<IHHHHH", 128 + len(raw), 0xAF11, 1, w, h, 8) + b"\0" * 128,
        "FTEX": b"FTEX" + struct.pack("<5I", 0x0B, w, h, 1, 1) + b"\0" * 64,
        "IMT": b"\x0c" + b"width 17\x0cheight 13\x0cpixel n8\x0c" + raw,
        "IPTC": b"\x1c\x01\x00\x00\x04abcd",
        "MPEG": b"\x00\x00\x01\xb3" + struct.pack(">HBx", (w << 4) | (h >> 8), h & 0xFF) + raw,
        "PCD": b"\0" * 2048 + b"PCD_IPI" + b"\0" * 4096,
        "BUFR": b"BUFR" + b"\0" * 60,
        "GRIB": b"GRIB" + b"\0" * 60,
        "HDF5": b"\x89HDF\r\n\x1a\n" + b"\0" * 60,
        "WMF": b"\xd7\xcd\xc6\x9a" + b"\0" * 60,
    }
    return [Sample(f"{fmt}-handmade", data, fmt, "seed") for fmt, data in seeds.items()]


# ------------------------------------------------------------------ mutations
def truncations(seed: Sample) -> Iterator[Sample]:
    data = seed.data
    cuts = {1, 2, 4, 8, 12, 16, 24, 32, 64, len(data) - 1}
    cuts |= {len(data) * f // 10 for f in (1, 3, 5, 7, 9)}
    for cut in sorted(c for c in cuts if 0 < c < len(data)):
        yield Sample(f"{seed.name}/truncate-{cut}", data[:cut], seed.source, "truncated")


def mutations(seed: Sample, rng: random.Random, flips: int = 8) -> Iterator[Sample]:
    data = seed.data
    n = len(data)
    for i in range(flips):
        pos, bit = rng.randrange(n), rng.randrange(8)
        out = bytearray(data)
        out[pos] ^= 1 << bit
        yield Sample(f"{seed.name}/flip-{i}@{pos}.{bit}", bytes(out), seed.source, "mutated")
    for i in range(4):
        start = rng.randrange(n)
        run = rng.randint(1, 16)
        fill = bytes([rng.choice((0x00, 0xFF, 0x7F, 0x80))]) * run
        yield Sample(
            f"{seed.name}/overwrite-{i}@{start}",
            data[:start] + fill + data[start + run :],
            seed.source,
            "mutated",
        )
    start = rng.randrange(n)
    junk = rng.randbytes(rng.randint(1, 64))
    blocks = {
        f"insert@{start}": data[:start] + junk + data[start:],
        f"delete@{start}": data[:start] + data[start + rng.randint(1, 64) :],
        f"duplicate@{start}": data[:start] + data[start : start + 32] + data[start:],
        "trailing-garbage": data + junk,
        "header-only": data[:32] + b"\0" * max(0, n - 32),
        "reversed-body": data[:16] + data[16:][::-1],
    }
    for name, out in blocks.items():
        yield Sample(f"{seed.name}/{name}", out, seed.source, "mutated")


# --------------------------------------------------------------- bad headers
EDGE_U32 = (0, 1, 0x7FFFFFFF, 0xFFFFFFFF, 100_000)
EDGE_U16 = (0, 1, 0x7FFF, 0xFFFF)


def _png_chunks(data: bytes) -> list[tuple[int, bytes, int]]:
    """(offset, type, length) of each chunk of a PNG."""
    out, pos = [], 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        kind = data[pos + 4 : pos + 8]
        out.append((pos, kind, length))
        pos += 12 + length
    return out


def _png_with(data: bytes, pos: int, body: bytes, fix_crc: bool = True) -> bytes:
    """Replace the body of the chunk at ``pos`` (same length), CRC fixed or not."""
    kind = data[pos + 4 : pos + 8]
    crc = (
        zlib.crc32(kind + body)
        if fix_crc
        else struct.unpack_from(">I", data, pos + 8 + len(body))[0]
    )
    end = pos + 12 + len(body)
    return data[: pos + 8] + body + struct.pack(">I", crc) + data[end:]


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def _text_bomb() -> bytes:
    """A zTXt chunk that inflates to 64 MiB of text."""
    return png_chunk(b"zTXt", b"k\0\0" + zlib.compress(b"\0" * (64 << 20), 9))


def png_headers(seed: Sample) -> Iterator[Sample]:
    data = seed.data
    chunks = _png_chunks(data)
    ihdr_pos = chunks[0][0]
    ihdr = bytearray(data[ihdr_pos + 8 : ihdr_pos + 21])
    fields = {"width": (0, ">I", EDGE_U32), "height": (4, ">I", EDGE_U32),
              "depth": (8, ">B", (0, 3, 16, 99)), "colour": (9, ">B", (1, 5, 7, 255)),
              "compression": (10, ">B", (1,)), "filter": (11, ">B", (1,)),
              "interlace": (12, ">B", (2, 255))}  # fmt: skip
    for field, (offset, fmt, values) in fields.items():
        for value in values:
            body = bytearray(ihdr)
            struct.pack_into(fmt, body, offset, value)
            for fix in (True, False):
                yield Sample(
                    f"{seed.name}/ihdr-{field}={value}{'' if fix else '-badcrc'}",
                    _png_with(data, ihdr_pos, bytes(body), fix),
                    seed.source,
                    "header",
                )
    for pos, kind, length in chunks:
        for value in (0, length + 1, 0x7FFFFFFF, 0xFFFFFFFF):
            out = bytearray(data)
            struct.pack_into(">I", out, pos, value)
            yield Sample(
                f"{seed.name}/{kind.decode('latin-1')}-length={value}", bytes(out),
                seed.source, "header",
            )  # fmt: skip
        if kind == b"IDAT":
            body = random.Random(length).randbytes(length)
            yield Sample(f"{seed.name}/idat-garbage", _png_with(data, pos, body), seed.source,
                         "header")  # fmt: skip
    iend = chunks[-1][0]
    text_bomb = _text_bomb()
    extra = {
        "no-iend": data[:iend],
        "ztxt-bomb": data[:iend] + text_bomb + data[iend:],
        "double-ihdr": data[: chunks[1][0]] + data[ihdr_pos : ihdr_pos + 25] + data[chunks[1][0] :],
        "unknown-critical": data[:iend] + png_chunk(b"ABCD", b"x" * 8) + data[iend:],
        "plte-odd": data[:iend] + png_chunk(b"PLTE", b"\1\2") + data[iend:],
    }
    for name, out in extra.items():
        yield Sample(f"{seed.name}/{name}", out, seed.source, "header")


def tiff_headers(seed: Sample) -> Iterator[Sample]:
    """Every IFD entry of the first IFD with every field type and absurd counts/offsets."""
    data = seed.data
    order = "<" if data[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", data, 4)
    (entries,) = struct.unpack_from(order + "H", data, ifd)
    for i in range(entries):
        at = ifd + 2 + 12 * i
        (tag,) = struct.unpack_from(order + "H", data, at)
        for kind in range(14):
            out = bytearray(data)
            struct.pack_into(order + "H", out, at + 2, kind)
            yield Sample(f"{seed.name}/tag{tag}-type={kind}", bytes(out), seed.source, "header")
        for field, offset in (("count", 4), ("value", 8)):
            for value in (0, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF):
                out = bytearray(data)
                struct.pack_into(order + "I", out, at + offset, value)
                yield Sample(
                    f"{seed.name}/tag{tag}-{field}={value}", bytes(out), seed.source, "header"
                )
    loop = bytearray(data)
    next_at = ifd + 2 + 12 * entries
    if next_at + 4 <= len(loop):
        struct.pack_into(order + "I", loop, next_at, ifd)  # the IFD chain loops on itself
        yield Sample(f"{seed.name}/ifd-loop", bytes(loop), seed.source, "header")
    for value in (0, 0xFFFF):
        out = bytearray(data)
        struct.pack_into(order + "H", out, ifd, value)
        yield Sample(f"{seed.name}/ifd-entries={value}", bytes(out), seed.source, "header")
    for value in (0, 8, len(data), 0xFFFFFFFF):
        out = bytearray(data)
        struct.pack_into(order + "I", out, 4, value)
        yield Sample(f"{seed.name}/ifd-offset={value}", bytes(out), seed.source, "header")


def _patched(seed: Sample, name: str, offset: int, fmt: str, value: int) -> Sample | None:
    if offset + struct.calcsize(fmt) > len(seed.data):
        return None
    out = bytearray(seed.data)
    struct.pack_into(fmt, out, offset, value)
    return Sample(f"{seed.name}/{name}={value}", bytes(out), seed.source, "header")


def gif_headers(seed: Sample) -> Iterator[Sample]:
    data = seed.data
    fields = [("screen-width", 6, "<H", EDGE_U16), ("screen-height", 8, "<H", EDGE_U16),
              ("screen-flags", 10, "<B", (0x00, 0xFF))]  # fmt: skip
    image = data.find(b"\x2c", 13)
    if image > 0:
        fields += [("frame-left", image + 1, "<H", (0xFFFF,)),
                   ("frame-top", image + 3, "<H", (0xFFFF,)),
                   ("frame-width", image + 5, "<H", EDGE_U16),
                   ("frame-height", image + 7, "<H", EDGE_U16),
                   ("frame-flags", image + 9, "<B", (0xFF, 0x40)),
                   ("lzw-min-code", image + 10, "<B", (0, 1, 12, 255))]  # fmt: skip
    for name, offset, fmt, values in fields:
        for value in values:
            sample = _patched(seed, name, offset, fmt, value)
            if sample is not None:
                yield sample


def bmp_headers(seed: Sample) -> Iterator[Sample]:
    fields = [("data-offset", 10, "<I", (0, 14, 0x7FFFFFFF)), ("dib-size", 14, "<I", (0, 12, 200)),
              ("width", 18, "<i", (0, -1, 50_000, 2**31 - 1, -(2**31))),
              ("height", 22, "<i", (0, -1, -50_000, 2**31 - 1, -(2**31))),
              ("planes", 26, "<H", (0, 2)), ("bits", 28, "<H", (0, 7, 33, 64, 0xFFFF)),
              ("compression", 30, "<I", (1, 2, 3, 4, 5, 99)),
              ("colours-used", 46, "<I", (0xFFFF, 0x7FFFFFFF))]  # fmt: skip
    for name, offset, fmt, values in fields:
        for value in values:
            sample = _patched(seed, name, offset, fmt, value)
            if sample is not None:
                yield sample


def jpeg_headers(seed: Sample) -> Iterator[Sample]:
    data = seed.data
    sof = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2"))
    if sof < 0:
        return
    fields = [("precision", sof + 4, ">B", (0, 12, 16)), ("height", sof + 5, ">H", EDGE_U16),
              ("width", sof + 7, ">H", EDGE_U16), ("components", sof + 9, ">B", (0, 2, 5, 255)),
              ("sof-length", sof + 2, ">H", (0, 2, 0xFFFF))]  # fmt: skip
    for name, offset, fmt, values in fields:
        for value in values:
            sample = _patched(seed, name, offset, fmt, value)
            if sample is not None:
                yield sample
    for marker in (b"\xff\xc4", b"\xff\xdb", b"\xff\xda"):  # DHT, DQT, SOS
        at = data.find(marker)
        if at > 0:
            for value in (0, 1, 0xFFFF):
                sample = _patched(seed, f"{marker[1]:02x}-length", at + 2, ">H", value)
                if sample is not None:
                    yield sample
    yield Sample(f"{seed.name}/no-eoi", data[:-2], seed.source, "header")


def webp_headers(seed: Sample) -> Iterator[Sample]:
    data = seed.data
    for value in (0, 4, len(data) * 2, 0xFFFFFFFF):
        sample = _patched(seed, "riff-size", 4, "<I", value)
        if sample is not None:
            yield sample
    for fourcc in (b"VP8 ", b"VP8L", b"VP8X", b"ALPH", b"ANIM"):
        out = data[:12] + fourcc + data[16:]
        yield Sample(f"{seed.name}/chunk={fourcc.decode().strip()}", out, seed.source, "header")
    for value in (0, 0x7FFFFFFF, 0xFFFFFFFF):
        sample = _patched(seed, "chunk-size", 16, "<I", value)
        if sample is not None:
            yield sample
    kind = data[12:16]
    if kind == b"VP8 ":
        for value in (0, 0x3FFF):
            for name, offset in (("vp8-width", 26), ("vp8-height", 28)):
                sample = _patched(seed, name, offset, "<H", value)
                if sample is not None:
                    yield sample
    elif kind == b"VP8L":
        for value in (0, 0xFFFFFFFF):
            sample = _patched(seed, "vp8l-size-bits", 21, "<I", value)
            if sample is not None:
                yield sample


HEADERS = {"PNG": png_headers, "TIFF": tiff_headers, "GIF": gif_headers, "BMP": bmp_headers,
           "JPEG": jpeg_headers, "WEBP": webp_headers}  # fmt: skip


# --------------------------------------------------------------------- bombs
def bombs() -> list[Sample]:
    """Files that claim (or decode to) far more pixels than any limit allows."""
    side = 5000  # 25 megapixels of zeros: a real, decodable PNG of a few tens of kilobytes
    rows = zlib.compress(b"\0" * ((side + 1) * side), 9)
    zeros = b"\x89PNG\r\n\x1a\n" + png_chunk(
        b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    )
    zeros += png_chunk(b"IDAT", rows) + png_chunk(b"IEND", b"")
    out = [Sample("PNG-bomb-25MP-zeros", zeros, "PNG", "bomb")]
    small = {fmt: _save(base_image().convert("L"), fmt) for fmt in ("PNG", "GIF", "BMP", "TIFF")}
    small["JPEG"] = _save(base_image(), "JPEG")
    small["WEBP"] = _save(base_image(), "WEBP")
    for side in (65_535, 100_000, 0x7FFFFFFF, 0xFFFFFFFF):
        png = small["PNG"]
        ihdr = bytearray(png[16:29])
        struct.pack_into(">II", ihdr, 0, side, side)
        out.append(Sample(f"PNG-bomb-{side}", _png_with(png, 8, bytes(ihdr)), "PNG", "bomb"))
    for side in (4097, 20_000, 65_535):  # 4097^2: over the default 16 MP, under Pillow's
        gif = bytearray(small["GIF"])
        struct.pack_into("<HH", gif, 6, side, side)
        image = gif.find(b"\x2c", 13)
        struct.pack_into("<HH", gif, image + 5, side, side)
        out.append(Sample(f"GIF-bomb-{side}", bytes(gif), "GIF", "bomb"))
        jpeg = bytearray(small["JPEG"])
        sof = jpeg.find(b"\xff\xc0")
        struct.pack_into(">HH", jpeg, sof + 5, side, side)
        out.append(Sample(f"JPEG-bomb-{side}", bytes(jpeg), "JPEG", "bomb"))
    for side in (4097, 50_000, 2**31 - 1):
        bmp = bytearray(small["BMP"])
        struct.pack_into("<ii", bmp, 18, side, side)
        out.append(Sample(f"BMP-bomb-{side}", bytes(bmp), "BMP", "bomb"))
    tiff = small["TIFF"]
    order = "<" if tiff[:2] == b"II" else ">"
    (ifd,) = struct.unpack_from(order + "I", tiff, 4)
    (entries,) = struct.unpack_from(order + "H", tiff, ifd)
    for side in (4097, 100_000, 0xFFFFFFFF):
        out_tiff = bytearray(tiff)
        for i in range(entries):
            at = ifd + 2 + 12 * i
            (tag,) = struct.unpack_from(order + "H", out_tiff, at)
            if tag in (256, 257):  # ImageWidth, ImageLength
                struct.pack_into(order + "HI", out_tiff, at + 2, 4, 1)
                struct.pack_into(order + "I", out_tiff, at + 8, side)
        out.append(Sample(f"TIFF-bomb-{side}", bytes(out_tiff), "TIFF", "bomb"))
    lossless = _save(base_image(), "WEBP", lossless=True)
    if lossless is not None and lossless[12:16] == b"VP8L":
        webp = bytearray(lossless)
        (bits,) = struct.unpack_from("<I", webp, 21)
        bits = (bits & ~0x0FFFFFFF) | 16383 | (16383 << 14)  # 16384 x 16384 pixels
        struct.pack_into("<I", webp, 21, bits)
        out.append(Sample("WEBP-bomb-16384", bytes(webp), "WEBP", "bomb"))
    return out


# --------------------------------------------------------------------- build
def build(seed: int = 0) -> list[Sample]:
    """The whole corpus, the same for the same ``seed``."""
    rng = random.Random(seed)
    seeds = writable_seeds(seed) + open_only_seeds()
    corpus = list(seeds)
    for sample in seeds:
        corpus += truncations(sample)
        corpus += mutations(sample, rng)
        header = HEADERS.get(sample.source) if sample.source in ACCEPTED else None
        if header is not None:
            corpus += header(sample)
    corpus += bombs()
    corpus += [
        Sample("empty", b"", "-", "mutated"),
        Sample("one-byte", b"\0", "-", "mutated"),
        Sample("random-4k", random.Random(seed).randbytes(4096), "-", "mutated"),
    ]
    return corpus
