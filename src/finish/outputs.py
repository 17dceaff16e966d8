"""Images -> files: PNG, JPEG or WebP, with their generation parameters inside.

Every image file carries its generation parameters in AUTOMATIC1111's format (a PNG text chunk
``parameters``, or EXIF UserComment for JPEG and WebP), so tools that read A1111 metadata show them.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

from PIL import ExifTags, Image, PngImagePlugin

from src.prepare.delivery import FORMATS

__all__ = ["FORMATS", "PNG_COMPRESS_LEVEL", "WEBP_METHOD", "EncodedImage", "encode_image"]

# Chosen with bench/encode.py (figures in the README). PNG: zlib level 1 encodes a
# 1024² image in 87 ms against 376 ms at Pillow's default 6, for a file 18% larger.
# WebP: libwebp effort 2 of 6 halves the time of Pillow's default 4 for files 2-4% larger.
PNG_COMPRESS_LEVEL = 1
WEBP_METHOD = 2
_USER_COMMENT_UNICODE = b"UNICODE\x00"  # EXIF 2.3 character code for UTF-16 text, as A1111 writes it
# EXIF's tag types: a LONG (an offset), and UNDEFINED bytes, the type EXIF gives UserComment.
_LONG, _UNDEFINED = 4, 7


@dataclass(frozen=True)
class EncodedImage:
    """One image file, ready to send."""

    data: bytes
    # The seed that made it; None for an upscaled image.
    seed: int | None
    format: str
    nsfw: bool | None = None

    @property
    def label(self) -> str:
        """How it is named in its S3 key and in messages: ``seed 123``'s ``123``, or ``upscaled``."""
        return "upscaled" if self.seed is None else str(self.seed)


# A JPEG keeps its EXIF in one segment of at most 64 KiB, where the text goes as UTF-16: about 32000 characters.
_JPEG_EXIF_TEXT_BYTES = 65_000


def embeddable(output_format: str, texts: list[str | None], warnings: list[str]) -> list[str | None]:
    """Each of ``texts`` (the parameters of each image), or None where a file of ``output_format`` cannot carry it
    (a JPEG's EXIF cannot carry a very long one), which ``warnings`` then says, once."""
    fitted = [
        None if text is not None and output_format == "jpeg" and 2 * len(text) > _JPEG_EXIF_TEXT_BYTES else text
        for text in texts
    ]
    longest = max((len(text) for text, kept in zip(texts, fitted, strict=True) if text and kept is None), default=0)
    if longest:
        warnings.append(
            f"the parameters ({longest} characters) are not in the {output_format} file: its EXIF holds about "
            f"{_JPEG_EXIF_TEXT_BYTES // 2} characters; png and webp carry them whole"
        )
    return fitted


def exif_user_comment(text: str) -> bytes:
    """An EXIF block holding ``text`` as the Exif IFD's UserComment, as A1111 writes it (with piexif): typed
    UNDEFINED, the UNICODE character code, then UTF-16 big-endian. Pillow's own Exif types the tag BYTE, which
    A1111's reader (piexif) takes for a tuple of numbers and fails on: its PNG Info tab and /sdapi/v1/png-info read
    nothing from such a JPEG or WebP. A big-endian TIFF: IFD0 at 8, its one entry the Exif IFD's offset, 26; the
    Exif IFD's one entry the comment, at 44."""
    comment = _USER_COMMENT_UNICODE + text.encode("utf-16-be")
    ifd0 = struct.pack(">HHHII", 1, ExifTags.IFD.Exif, _LONG, 1, 26) + bytes(4)
    exif_ifd = struct.pack(">HHHII", 1, ExifTags.Base.UserComment, _UNDEFINED, len(comment), 44) + bytes(4)
    return b"Exif\x00\x00MM\x00*\x00\x00\x00\x08" + ifd0 + exif_ifd + comment


def encode_image(
    image: Image.Image, output_format: str, quality: int, parameters: str | None, postprocessing: str | None = None
) -> bytes:
    """``image`` as a file of ``output_format``, with ``parameters`` embedded when given, and ``postprocessing``
    (A1111's Extras line, such as ``Postprocess upscale by: 2, ...``) beside them in a PNG, or in their place in
    a JPEG's or WebP's EXIF when there are none."""
    spec = FORMATS[output_format]
    buffer = io.BytesIO()
    options: dict[str, Any] = {}
    if spec.pil_name == "PNG":
        options["compress_level"] = PNG_COMPRESS_LEVEL
        texts = {"parameters": parameters, "postprocessing": postprocessing}
        if any(text is not None for text in texts.values()):
            # add_text writes tEXt, or iTXt when the text is not Latin-1.
            info = PngImagePlugin.PngInfo()
            for key, text in texts.items():
                if text is not None:
                    info.add_text(key, text)
            options["pnginfo"] = info
    else:
        options["quality"] = quality
        if spec.pil_name == "WEBP":
            options["method"] = WEBP_METHOD
        comment = parameters if parameters is not None else postprocessing
        if comment is not None:
            options["exif"] = exif_user_comment(comment)
    image.save(buffer, format=spec.pil_name, **options)
    return buffer.getvalue()
