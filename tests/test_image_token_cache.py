"""The frozen ViT's token cache (kosmos2/model/image_token_cache.py): same features and gradients as running the ViT,
the ViT runs only on images it has not seen, stale entries go when the ViT's weights change, the size bound holds,
and a trainable ViT is refused."""
import pytest
import torch

from kosmos2 import build_model

from helpers import small_config


def frozen_model(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(small_config(freeze_image_encoder=True)).eval()


class ViTCalls:
    """Counts the images the ViT is run on."""

    def __init__(self, model):
        self.images = 0
        model.img_model.register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.images += args[0].shape[0]


def pixels(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def test_cached_features_and_gradients_equal_the_vits():
    cached, plain = frozen_model(), frozen_model()
    cached.cache_image_tokens(16)
    calls = ViTCalls(cached)
    first, second = pixels(3, 1), pixels(2, 2)
    mixed = torch.cat([second[:1], first[2:], second[1:], first[:1], first[:1]])  # 2 new images, 3 seen (one twice)
    for batch, expected_vit_images in ((first, 3), (mixed, 2), (mixed, 0)):
        before = calls.images
        out = cached.encode_images(batch)
        assert calls.images - before == expected_vit_images
        ref = plain.encode_images(batch)
        assert torch.allclose(out, ref, atol=1e-5), (out - ref).abs().max()
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, p), q in zip(cached.img_connector.named_parameters(), plain.img_connector.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4, rtol=1e-4), name
    assert (cached.image_token_cache.hits, cached.image_token_cache.misses) == (3 + 5, 3 + 2)


def test_changed_vit_weights_empty_the_cache():
    model, other = frozen_model(seed=0), frozen_model(seed=1)
    model.cache_image_tokens(16)
    images = pixels(2, 3)
    model.encode_images(images)
    model.img_model.load_state_dict(other.img_model.state_dict())  # in-place copies: the tensors' versions move
    model.img_connector.load_state_dict(other.img_connector.state_dict())
    assert torch.allclose(model.encode_images(images), other.encode_images(images), atol=1e-5)
    assert model.image_token_cache.misses == 4


def test_least_recently_used_image_goes_first_when_full():
    model = frozen_model()
    model.cache_image_tokens(2)
    calls = ViTCalls(model)
    a, b, c = pixels(3, 4).split(1)
    for image in (a, b, a, c):  # c evicts b, the least recently used
        model.encode_images(image)
    assert len(model.image_token_cache) == 2 and calls.images == 3
    model.encode_images(a)
    assert calls.images == 3
    model.encode_images(b)
    assert calls.images == 4


def test_a_trainable_vit_cannot_be_cached():
    model = build_model(small_config(freeze_image_encoder=False))
    with pytest.raises(ValueError, match="frozen ViT"):
        model.cache_image_tokens(8)
    frozen = frozen_model()
    frozen.cache_image_tokens(8)
    with pytest.raises(ValueError, match="turn it off"):
        frozen.set_image_encoder_trainable(True)
    frozen.cache_image_tokens(0)
    frozen.set_image_encoder_trainable(True)
    assert frozen.image_token_cache is None and frozen.image_encoder_trainable
