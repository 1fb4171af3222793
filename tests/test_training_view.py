"""One geometry for the training view (`kosmos2.image.CentreCrop`): the torch transform, the numpy transform of the
loader workers and the grounding labels' box correction put the same box in the same place (hand-computed cases)."""
import numpy as np
import pytest
from PIL import Image

from kosmos2.data.grounding_labels import centercrop_box
from kosmos2.image import CLIP_MEAN, CLIP_STD, CentreCrop, train_transform, train_transform_numpy, training_view


def test_centre_crop_geometry_hand_computed():
    # 400 x 200 to S = 100: the short side 200 -> 100, the long side 400 -> 200; 100 px cut, half on each side
    crop = CentreCrop(400, 200, 100)
    assert crop.resized == (200, 100) and crop.offset == (50.0, 0.0) and crop.pixel_offset == (50, 0)
    # portrait, and a long side that truncates: 200 * 333 / 200 -> 166.5 -> 166
    crop = CentreCrop(200, 333, 100)
    assert crop.resized == (100, 166) and crop.offset == (0.0, 33.0) and crop.pixel_offset == (0, 33)
    # an odd excess: boxes move by the exact half (25.5), pixels are cut at torchvision's int(round(.)), which
    # rounds half to even: 25.5 -> 26, 26.5 -> 26
    assert CentreCrop(302, 200, 100).offset == (25.5, 0.0) and CentreCrop(302, 200, 100).pixel_offset == (26, 0)
    assert CentreCrop(306, 200, 100).offset == (26.5, 0.0) and CentreCrop(306, 200, 100).pixel_offset == (26, 0)
    # a short side already at S: nothing resized
    assert CentreCrop(448, 224, 224).resized == (448, 224)


def _white_rectangle(width: int, height: int, box_px: tuple[int, int, int, int]) -> Image.Image:
    pixels = np.zeros((height, width, 3), dtype=np.uint8)
    x1, y1, x2, y2 = box_px
    pixels[y1:y2, x1:x2] = 255
    return Image.fromarray(pixels)


def _bright_bounds(pixels_chw: np.ndarray) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2), exclusive ends, of the pixels brighter than mid-grey after undoing the normalisation."""
    red = pixels_chw[0] * CLIP_STD[0] + CLIP_MEAN[0]
    ys, xs = np.nonzero(red > 0.5)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@pytest.mark.parametrize("width, height, rect_px, expected_box", [
    # landscape 400 x 200 -> resized 200 x 100, crop x in [50, 150): the rectangle x 200..300, y 50..150 becomes
    # resized x 100..150, y 25..75, i.e. crop x 50..100 (cut at the crop's right edge), y 25..75
    (400, 200, (200, 50, 300, 150), [0.5, 0.25, 1.0, 0.75]),
    # portrait 200 x 400 -> resized 100 x 200, crop y in [50, 150): the rectangle x 40..160, y 60..200 becomes
    # resized x 20..80, y 30..100, i.e. crop x 20..80, y 0..50 (cut at the top)
    (200, 400, (40, 60, 160, 200), [0.2, 0.0, 0.8, 0.5]),
])
def test_pixels_and_boxes_share_the_geometry(width, height, rect_px, expected_box):
    size = 100
    image = _white_rectangle(width, height, rect_px)
    x1, y1, x2, y2 = rect_px
    box = centercrop_box((width, height), size, (x1 / width, y1 / height, x2 / width, y2 / height), drop_crop_thr=0.2)
    assert box == pytest.approx(expected_box, abs=1e-7)

    torch_pixels = train_transform(size)(image).numpy()
    numpy_pixels = train_transform_numpy(size)(image)
    assert np.array_equal(torch_pixels, numpy_pixels)
    # the bicubic resize blurs the edges symmetrically, so the half-brightness contour is exactly the box
    assert _bright_bounds(torch_pixels) == tuple(round(v * size) for v in expected_box)
    assert np.asarray(training_view(image, size)).shape == (size, size, 3)


def test_only_resize_view_is_the_square_resize():
    image = _white_rectangle(400, 200, (200, 50, 300, 150))
    square = np.asarray(training_view(image, 100, only_resize=True))
    assert square.shape == (100, 100, 3)
    assert np.array_equal(square, np.asarray(image.resize((100, 100), Image.BICUBIC)))
