"""Image loading (modes, EXIF, animation, limits, errors) and the transforms against torchvision / transformers."""
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from kosmos2.image import (CLIP_MEAN, CLIP_STD, ImageLoadError, ImageSizeError, denormalize, inference_transform, load_image,
                           preprocess, short_side_resize_size, train_transform)

T = pytest.importorskip("torchvision.transforms")


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kwargs)
    return buf.getvalue()


def _pixel(image, xy=(0, 0)):
    return image.getpixel(xy)


def _random_rgb(w, h, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# ---- modes

def test_rgba_la_pa_composite_on_white():
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(255, 0, 0, 255), (255, 0, 0, 0), (255, 0, 0, 128)])
    out = load_image(_encode(rgba, "PNG"))
    assert out.mode == "RGB" and out.size == (3, 1)
    assert _pixel(out, (0, 0)) == (255, 0, 0)
    assert _pixel(out, (1, 0)) == (255, 255, 255)  # fully transparent -> white, not black
    assert _pixel(out, (2, 0)) == (255, 127, 127)  # half transparent red over white
    la = Image.new("LA", (1, 1), (40, 0))
    assert _pixel(load_image(_encode(la, "PNG"))) == (255, 255, 255)
    pa = Image.new("RGBA", (1, 1), (0, 0, 255, 255)).convert("PA")
    assert _pixel(load_image(pa)) == (0, 0, 255)


def test_premultiplied_modes():
    rgba = Image.new("RGBA", (1, 1), (200, 100, 50, 128))
    premultiplied = rgba.convert("RGBa")
    expected = _pixel(load_image(rgba))
    assert all(abs(a - b) <= 1 for a, b in zip(_pixel(load_image(premultiplied)), expected))
    la = Image.frombytes("La", (1, 1), bytes([50, 128]))  # premultiplied grey 50 at alpha 128
    assert _pixel(load_image(la)) == (177, 177, 177)  # 50 + (255 - 128)


def test_palette_with_transparency():
    p = Image.new("P", (2, 1))
    p.putpalette([0, 255, 0] + [255, 0, 0] + [0] * 762)
    p.putdata([0, 1])
    p.info["transparency"] = 0
    out = load_image(_encode(p, "PNG", transparency=0))
    assert _pixel(out, (0, 0)) == (255, 255, 255) and _pixel(out, (1, 0)) == (255, 0, 0)
    p_plain = Image.new("P", (1, 1))
    p_plain.putpalette([10, 20, 30] + [0] * 765)
    assert _pixel(load_image(p_plain)) == (10, 20, 30)


@pytest.mark.parametrize("mode,value,expected", [
    ("L", 100, (100, 100, 100)),
    ("1", 1, (255, 255, 255)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ("I;16", 65535, (255, 255, 255)),
    ("I;16", 32768, (128, 128, 128)),  # 16-bit scaled by 1/257, not clipped at 255
    ("I", 1000, (4, 4, 4)),  # 16-bit data stored in I: 1000 / 257 = 3.9
    ("I", 200, (200, 200, 200)),  # 8-bit range data in I stays as it is
    ("F", 0.5, (128, 128, 128)),  # [0, 1] floats
    ("YCbCr", (76, 85, 255), (254, 0, 0)),
])
def test_single_channel_and_other_modes(mode, value, expected):
    out = load_image(Image.new(mode, (2, 2), value))
    assert out.mode == "RGB" and out.size == (2, 2)
    assert all(abs(a - b) <= 1 for a, b in zip(_pixel(out), expected)), _pixel(out)


def test_sixteen_bit_png_and_cmyk_jpeg_files():
    grey16 = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    out = load_image(_encode(grey16, "PNG"))  # Pillow opens this as I;16 (older versions: I)
    assert _pixel(out, (0, 0)) == (0, 0, 0) and _pixel(out, (1, 0)) == (255, 255, 255)
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    out = load_image(_encode(cmyk, "JPEG", quality=100))
    assert out.mode == "RGB" and all(abs(a - b) <= 3 for a, b in zip(_pixel(out, (4, 4)), (255, 0, 0)))


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    out = load_image(_encode(image, "JPEG", exif=exif.tobytes(), quality=100))
    assert out.size == (20, 40)
    r, g, b = _pixel(out, (10, 5))  # the left half becomes the top half
    assert r > 200 and b < 60
    r, g, b = _pixel(out, (10, 35))
    assert b > 200 and r < 60


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (6, 6), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    out = load_image(buf.getvalue())
    assert _pixel(out) == (255, 0, 0)
    opened = Image.open(io.BytesIO(buf.getvalue()))
    opened.seek(1)
    assert _pixel(load_image(opened)) == (255, 0, 0)


def test_sources_path_bytes_fileobj_pil(tmp_path):
    image = _random_rgb(5, 7)
    path = tmp_path / "x.png"
    image.save(path)
    reference = np.asarray(image)
    for source in (path, str(path), path.read_bytes(), bytearray(path.read_bytes()), open(path, "rb"), image):
        assert np.array_equal(np.asarray(load_image(source)), reference)


# ---- sizes and errors

def test_one_by_one_image_is_processed():
    pixels = preprocess(Image.new("RGB", (1, 1), (255, 128, 0)), 224)
    assert pixels.shape == (1, 3, 224, 224)
    expected = (torch.tensor([255, 128, 0]) / 255.0 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    assert torch.allclose(pixels[0, :, 100, 37], expected, atol=1e-6)
    assert torch.allclose(pixels.amin(dim=(2, 3)), pixels.amax(dim=(2, 3)))


def test_not_an_image():
    with pytest.raises(ImageLoadError, match="not an image Pillow can read"):
        load_image(b"this is not an image")
    with pytest.raises(ImageLoadError, match="<18 bytes> has a corrupt or truncated image header"):
        load_image(b"\x89PNG\r\n\x1a\n garbage..")
    with pytest.raises(FileNotFoundError, match="image file not found: /no/such/file.jpg"):
        load_image("/no/such/file.jpg")
    with pytest.raises(TypeError, match="expects a path, bytes"):
        load_image(123)


def test_truncated_file():
    data = _encode(_random_rgb(64, 64), "JPEG")
    with pytest.raises(ImageLoadError, match="could not be decoded"):
        load_image(data[: len(data) // 2])


def _png_header_only(width, height) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, body: struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def test_size_limits(monkeypatch):
    # a header claiming 100000 x 100000 pixels: refused with a clear message before any decoding
    with pytest.raises(ImageSizeError, match="10000000000 pixels, more than max_pixels=178956970.*or None"):
        load_image(_png_header_only(100_000, 100_000))
    with pytest.raises(ImageSizeError, match="20000x20000 = 400000000 pixels, more than max_pixels=1000000"):
        load_image(_png_header_only(20_000, 20_000), max_pixels=1_000_000)
    small = _encode(_random_rgb(30, 30), "PNG")
    with pytest.raises(ImageSizeError, match="30x30, smaller than min_size=32"):
        load_image(small, min_size=32)
    # our limit, not Pillow's global one, decides; Pillow's global is restored afterwards
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    assert load_image(small, max_pixels=None).size == (30, 30)
    assert load_image(small, max_pixels=10_000).size == (30, 30)
    with pytest.raises(ImageSizeError):
        load_image(small, max_pixels=500)
    assert Image.MAX_IMAGE_PIXELS == 100


# ---- transforms

def _torchvision_inference(size):
    return T.Compose([T.Resize((size, size), interpolation=T.InterpolationMode.BICUBIC), T.ToTensor(), T.Normalize(CLIP_MEAN, CLIP_STD)])


@pytest.mark.parametrize("wh", [(517, 300), (120, 380), (224, 224), (3, 2)])
def test_inference_transform_equals_torchvision(wh):
    image = _random_rgb(*wh, seed=wh[0])
    ours = inference_transform(224)(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert torch.allclose(ours, _torchvision_inference(224)(image), atol=1e-6, rtol=0)


def test_inference_transform_equals_clip_image_processor():
    pil_backend = pytest.importorskip("transformers.models.clip.image_processing_pil_clip")
    image = _random_rgb(517, 300, seed=3)
    processor = pil_backend.CLIPImageProcessorPil(size={"height": 224, "width": 224}, do_center_crop=False)
    theirs = processor(images=image, return_tensors="pt").pixel_values[0]
    # Same PIL bicubic resize of the uint8 image, then /255 and (x - mean) / std in float32: equal up to float
    # rounding of the normalisation (observed difference 0). transformers 5's default CLIPImageProcessor uses the
    # torchvision backend instead, which resizes a uint8 tensor with torch's antialiased bicubic kernel and
    # differs from PIL (and from the official demo) by up to ~0.015 after normalisation, so it is not the reference.
    assert torch.allclose(inference_transform(224)(image), theirs, atol=1e-5, rtol=0)


@pytest.mark.parametrize("wh", [(517, 300), (120, 381), (224, 224), (225, 224), (50, 40)])
def test_train_transform_equals_torchvision(wh):
    image = _random_rgb(*wh, seed=wh[1])
    reference = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                           T.Normalize(CLIP_MEAN, CLIP_STD)])(image)
    ours = train_transform(224)(image)
    assert ours.shape == (3, 224, 224) and ours.dtype == torch.float32
    assert torch.allclose(ours, reference, atol=1e-6, rtol=0)
    assert short_side_resize_size(517, 300, 224) == (386, 224)


def test_preprocess_batch_and_original_sizes(tmp_path):
    images = [_random_rgb(64, 48, seed=1), _random_rgb(20, 90, seed=2)]
    path = tmp_path / "b.png"
    images[1].save(path)
    batch = preprocess([images[0], path], 32)
    assert batch.shape == (2, 3, 32, 32)
    assert torch.allclose(batch[1], inference_transform(32)(images[1]))
    assert [load_image(x).size for x in (images[0], path)] == [(64, 48), (20, 90)]
    restored = denormalize(batch[0])
    assert restored.min() >= 0 and restored.max() <= 1
    with pytest.raises(ValueError, match="at least one image"):
        preprocess([], 32)
