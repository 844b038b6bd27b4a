"""One image file (or its bytes) as uint8 [C, H, W], refusing what would crash the process.

Pillow reads every header first, so the size it claims is checked before anything is
decoded. JPEG and WebP then go to torchvision's decoders, which are faster and raise an
exception on corrupt data. Everything else, PNG above all, is decoded by Pillow:
torchvision's PNG decoder kills the process (SIGSEGV, past any ``except``) on most corrupt
PNGs (a bad CRC, a broken or short zlib stream, a bad filter byte). A PNG's chunk checksums
are verified first, since Pillow stops reading once the last row is filled and so would
not notice a corrupt tail. 16 bits per channel keep their most significant byte.
"""

from __future__ import annotations

import io
import re
import warnings
from pathlib import Path

import torch

from vae_cli.errors import UserError, one_line

# Pixels an image may decode to (8192 x 8192): a small file can claim a huge size (a
# decompression bomb), so the size in its header is checked before anything is decoded.
MAX_PIXELS = 2**26
TORCHVISION_FORMATS = ("JPEG", "MPO", "WEBP")  # MPO: a phone camera's multi-picture JPEG


def decode(src: Path | bytes, channels: int, name: str = "") -> torch.Tensor:
    """uint8 [channels, H, W] from an image file or its bytes (see the module)."""
    name = name or str(src)
    data = src.read_bytes() if isinstance(src, Path) else src
    with _opened(data) as im:
        _check_size(im.size, name)
        fmt = im.format
        if fmt == "PNG":
            im.verify()  # every chunk's CRC; a verified image must be opened again
            _check_rows(data)
    if fmt in TORCHVISION_FORMATS:
        # torchvision's webp decoder has no grey mode (and warns for each image)
        img = _by_torchvision(data, 3 if fmt == "WEBP" else channels)
    else:
        img = _by_pillow(data, channels)
    return _fitted(img, channels)


def decode_failure(name: str, e: Exception) -> str:
    """One line for an image that did not decode: its name and the decoder's message,
    without torchvision's C++ source location prefix."""
    if isinstance(e, UserError):  # already names the image
        return str(e)
    message = re.sub(r"^.*?\.cpp:\d+, ", "", one_line(e))
    return f"cannot decode image {name}: {message}"


def _opened(data: bytes):
    from PIL import Image, UnidentifiedImageError

    # Pillow's own bomb check would refuse before _check_size can say which image and why.
    limit, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        return Image.open(io.BytesIO(data))
    except UnidentifiedImageError:  # its message names a BytesIO object, not the file
        raise ValueError("not a png, jpeg, bmp or webp image") from None
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _check_rows(png: bytes) -> None:
    """A PNG's image stream holds every row its header claims: Pillow fills the rows of a
    stream that ends early with black, silently (costs one more decompression)."""
    import struct
    import zlib

    pos, stream, header = 8, [], b""
    while pos + 8 <= len(png):
        size, kind = struct.unpack(">I4s", png[pos:pos + 8])
        body = png[pos + 8:pos + 8 + size]
        header = body if kind == b"IHDR" else header
        stream += [body] if kind == b"IDAT" else []
        pos += 12 + size
    w, h, depth, colour, _, _, interlaced = struct.unpack(">IIBBBBB", header[:13])
    bits = depth * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}.get(colour, 1)
    passes = ADAM7 if interlaced else ((0, 0, 1, 1),)
    need = 0
    for x0, y0, dx, dy in passes:  # each pass's rows: a filter byte and their pixels
        pw, ph = -(-(w - x0) // dx), -(-(h - y0) // dy)
        need += ph * (1 + -(-(pw * bits) // 8)) if pw > 0 and ph > 0 else 0
    # counted chunk by chunk in pieces of at most 1 MiB, up to what is needed: neither the
    # stream nor its rows are held whole (an image of 8192 x 8192 RGBA is 256 MiB of rows)
    inflate, got = zlib.decompressobj(), 0
    for body in stream:
        while body and got < need:
            got += len(inflate.decompress(body, 1 << 20))
            body = inflate.unconsumed_tail
    got += len(inflate.flush()) if got < need else 0
    if got < need:
        raise ValueError(f"its image stream ends after {got} of {need} bytes (a truncated "
                         "PNG)")


# Adam7's passes: first column and row, then the steps between their pixels
ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2),
         (0, 1, 1, 2))


def _check_size(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise UserError(f"{name} would decode to {w}x{h} pixels, over the limit of "
                        f"{MAX_PIXELS} (8192x8192); resize it or leave it out")


def _by_torchvision(data: bytes, channels: int) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image

    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its decoders (TorchCodec)
        warnings.simplefilter("ignore", DeprecationWarning)
        # EXIF orientation: phone photos are often stored sideways with a rotation tag.
        return decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode,
                            apply_exif_orientation=True)


def _by_pillow(data: bytes, channels: int) -> torch.Tensor:
    import numpy as np
    from PIL import ImageOps

    target = "L" if channels == 1 else "RGB"
    with _opened(data) as im, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a palette's transparency, dropped
        ImageOps.exif_transpose(im, in_place=True)  # as torchvision does for a JPEG
        if im.mode.startswith("I;16"):  # 16-bit grey, scaled by _fitted: convert() clips
            return torch.from_numpy(np.array(im).astype(np.uint16))[None]
        arr = np.array(im if im.mode == target else im.convert(target))
    img = torch.from_numpy(arr)
    return img[None] if img.ndim == 2 else img.permute(2, 0, 1)


def _fitted(img: torch.Tensor, channels: int) -> torch.Tensor:
    """uint8 with ``channels`` channels."""
    from torchvision.transforms.v2 import functional as F

    if img.dtype != torch.uint8:  # 16 bits per channel: the most significant byte
        img = F.to_dtype(img, torch.uint8, scale=True)
    # The webp decoder ignores GRAY and returns RGB(A), so fix the channel count here.
    img = img[:3] if img.shape[0] == 4 else img[:1] if img.shape[0] == 2 else img
    if img.shape[0] != channels:
        img = F.rgb_to_grayscale(img) if channels == 1 else img.expand(3, -1, -1)
    return img
