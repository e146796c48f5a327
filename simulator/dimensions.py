"""Output image dimensions (width, height) per model family, aspect ratio and image size."""

from __future__ import annotations

ASPECT_RATIOS = ("1:1", "2:3", "3:2", "3:4", "4:3", "4:5", "5:4", "9:16", "16:9", "21:9")
IMAGE_SIZES = ("1K", "2K", "4K")

# ratio -> (2.5 Flash, 3 Pro 1K, 3 Pro 2K, 3 Pro 4K), from the upstream README.
_TABLE: dict[str, tuple[tuple[int, int], ...]] = {
    "1:1": ((1024, 1024), (1024, 1024), (2048, 2048), (4096, 4096)),
    "2:3": ((832, 1248), (848, 1264), (1696, 2528), (3392, 5056)),
    "3:2": ((1248, 832), (1264, 848), (2528, 1696), (5056, 3392)),
    "3:4": ((864, 1184), (896, 1200), (1792, 2400), (3584, 4800)),
    "4:3": ((1184, 864), (1200, 896), (2400, 1792), (4800, 3584)),
    "4:5": ((896, 1152), (928, 1152), (1856, 2304), (3712, 4608)),
    "5:4": ((1152, 896), (1152, 928), (2304, 1856), (4608, 3712)),
    "9:16": ((768, 1344), (768, 1376), (1536, 2752), (3072, 5504)),
    "16:9": ((1344, 768), (1376, 768), (2752, 1536), (5504, 3072)),
    "21:9": ((1536, 672), (1584, 672), (3168, 1344), (6336, 2688)),
}


def image_dimensions(model: str, aspect_ratio: str, image_size: str) -> tuple[int, int]:
    """(width, height) the upstream returns; "2.5-flash" models ignore image_size (1K only)."""
    column = 0 if "2.5-flash" in model else 1 + IMAGE_SIZES.index(image_size)
    return _TABLE[aspect_ratio][column]
