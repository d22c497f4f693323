"""Image input shared by every family's processor: open fully, fail by file name."""
from __future__ import annotations

import os
from typing import Union

from ms_mm.data.errors import BadSampleError

ImageLike = Union[str, os.PathLike, "PIL.Image.Image"]  # noqa: F821


def load_image(image: ImageLike):
    """Open an image as RGB, decoding it fully now so a corrupt file fails here, by name."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    path = os.fspath(image)
    if not os.path.isfile(path):
        raise BadSampleError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except Exception as e:  # PIL raises several types (UnidentifiedImageError, OSError, SyntaxError)
        raise BadSampleError(f"cannot read image {path}: {type(e).__name__}: {e}") from None
