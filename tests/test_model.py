"""The U-Net: shapes over depths and odd sizes, layout of the original, safety of the
skip-connection hooks (exceptions, threads, calling `layers` directly), copying."""

from __future__ import annotations

import copy
import gc
import threading
import weakref

import pytest
import torch
from torch import nn

from tumorseg.config import ModelConfig
from tumorseg.model import Block, UNet


def tiny(depth: int = 4, n_features: int = 4, in_channels: int = 3, seed: int = 0, **kw) -> UNet:
    torch.manual_seed(seed)
    return UNet(in_channels=in_channels, out_channels=1, n_features=n_features, depth=depth, **kw)


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
@pytest.mark.parametrize("hw", [(17, 33), (64, 64), (100, 77), (1, 1)])
def test_output_shape_equals_input_shape(depth, hw):
    model = tiny(depth).eval()
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 1, *hw)
    assert y.dtype == torch.float32


@pytest.mark.parametrize("out_channels", [1, 2])
def test_out_channels(out_channels):
    model = UNet(in_channels=1, out_channels=out_channels, n_features=4, depth=3).eval()
    with torch.no_grad():
        assert model(torch.rand(1, 1, 24, 20)).shape == (1, out_channels, 24, 20)


def test_forward_returns_logits_not_probabilities():
    # BN in training mode centres activations, so the 1x1 conv output takes both signs;
    # a sigmoid in forward would confine it to (0, 1).
    model = tiny(3)
    y = model(torch.rand(2, 3, 32, 32) * 10)
    assert (y < 0).any()


@pytest.mark.parametrize("depth", [2, 3, 4, 5])
def test_forward_backward_reaches_every_parameter(depth):
    model = tiny(depth)
    x = torch.rand(2, 3, 33, 17, requires_grad=True)
    model(x).square().mean().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert missing == []
    # The first encoder conv only gets its gradient through the whole network.
    assert model.layers[0].conv1.weight.grad.abs().sum() > 0


def test_padding_is_cropped_and_does_not_change_valid_sizes():
    # 32x32 is a multiple of 2**3, so nothing is padded: a 31x31 input is the same image
    # zero-padded by the model at the bottom and right, and its output is the crop.
    model = tiny(4).eval()
    x = torch.rand(1, 3, 31, 31)
    padded = torch.nn.functional.pad(x, (0, 1, 0, 1))
    with torch.no_grad():
        assert torch.equal(model(x), model(padded)[..., :31, :31])


def test_layer_layout_of_depth_4():
    model = tiny(4)
    kinds = [type(m) for m in model.layers]
    assert len(kinds) == 14
    assert [i for i, k in enumerate(kinds) if k is Block] == [0, 2, 4, 6, 8, 10, 12]
    assert [i for i, k in enumerate(kinds) if k is nn.MaxPool2d] == [1, 3, 5]
    assert [i for i, k in enumerate(kinds) if k is nn.ConvTranspose2d] == [7, 9, 11]
    assert [i for i, k in enumerate(kinds) if k is nn.Conv2d] == [13]
    for i in (1, 3, 5):
        assert model.layers[i].kernel_size == 2 and model.layers[i].stride == 2
    for i in (7, 9, 11):
        up = model.layers[i]
        assert up.kernel_size == (2, 2) and up.stride == (2, 2) and up.bias is None
    assert model.layers[13].kernel_size == (1, 1)


def test_skip_hooks_sit_on_encoder_blocks_and_up_convolutions():
    model = tiny(4)
    hooked = [i for i, m in enumerate(model.layers) if len(m._forward_hooks) > 0]
    assert hooked == [0, 2, 4, 7, 9, 11]
    names = {i: [h.__name__ for h in model.layers[i]._forward_hooks.values()] for i in hooked}
    assert names == {0: ["_push_activation"], 2: ["_push_activation"], 4: ["_push_activation"],
                     7: ["_pop_and_concat"], 9: ["_pop_and_concat"], 11: ["_pop_and_concat"]}


def test_block_is_conv_bn_relu_twice_with_bias():
    block = tiny(2, n_features=5).layers[0]
    assert [type(m) for m in block.children()] == [nn.Conv2d, nn.BatchNorm2d, nn.Conv2d,
                                                  nn.BatchNorm2d, nn.ReLU]
    assert block.conv1.weight.shape == (5, 3, 3, 3) and block.conv1.bias is not None
    assert block.conv1.padding == (1, 1) and block.conv2.weight.shape == (5, 5, 3, 3)


def test_every_level_has_n_features_like_the_original():
    model = tiny(4, n_features=6)
    assert [model.layers[i].conv1.weight.shape[0] for i in (0, 2, 4, 6, 8, 10, 12)] == [6] * 7
    assert [model.layers[i].conv1.weight.shape[1] for i in (8, 10, 12)] == [12, 12, 12]


def test_widening_features_shapes():
    model = tiny(4, features=(8, 16, 32, 64)).eval()
    L = model.layers
    assert [L[i].conv1.weight.shape[:2] for i in (0, 2, 4, 6)] == [
        (8, 3), (16, 8), (32, 16), (64, 32)]
    # ConvTranspose2d weight is (in, out, k, k): 64->32, 32->16, 16->8.
    assert [tuple(L[i].weight.shape) for i in (7, 9, 11)] == [
        (64, 32, 2, 2), (32, 16, 2, 2), (16, 8, 2, 2)]
    # Decoder blocks take upsampled + skip = 2w channels and give w.
    assert [L[i].conv1.weight.shape[:2] for i in (8, 10, 12)] == [(32, 64), (16, 32), (8, 16)]
    assert L[13].weight.shape == (1, 8, 1, 1)
    assert model.config == ModelConfig(3, 1, 4, 4, (8, 16, 32, 64))
    with torch.no_grad():
        assert model(torch.rand(2, 3, 40, 24)).shape == (2, 1, 40, 24)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(depth=1), "depth must be >= 2, got 1"),
        (dict(depth=0), "depth must be >= 2, got 0"),
        (dict(depth=3, features=(4, 8)), "features must have 3 entries"),
        (dict(depth=2, features=(4, 8, 16)), "features must have 2 entries"),
        (dict(depth=2, n_features=0), "channel counts must be >= 1"),
        (dict(depth=2, in_channels=0), "channel counts must be >= 1"),
    ],
)
def test_bad_constructor_arguments_raise_value_error(kwargs, fragment):
    with pytest.raises(ValueError) as info:
        UNet(**kwargs)
    assert fragment in str(info.value)


@pytest.mark.parametrize(
    "shape, expected",
    [((1, 1, 16, 16), "expected input of shape (B, 3, H, W), got (1, 1, 16, 16)"),
     ((1, 4, 16, 16), "expected input of shape (B, 3, H, W), got (1, 4, 16, 16)"),
     ((3, 16, 16), "expected input of shape (B, 3, H, W), got (3, 16, 16)")],
)
def test_wrong_input_shape_raises_with_message(shape, expected):
    with pytest.raises(ValueError) as info:
        tiny(2)(torch.rand(*shape))
    assert str(info.value) == expected


def test_exception_mid_forward_does_not_poison_next_call():
    model = tiny(4).eval()
    x = torch.rand(2, 3, 24, 24)
    with torch.no_grad():
        before = model(x)
    calls = []

    def fail_once(module, inputs, output):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected failure")

    handle = model.layers[9].register_forward_hook(fail_once)
    try:
        with pytest.raises(RuntimeError, match="injected failure"), torch.no_grad():
            model(x)
    finally:
        handle.remove()
    with torch.no_grad():
        after = model(x)
        fresh = copy.deepcopy(model)(x)
    assert torch.equal(after, before)
    assert torch.equal(after, fresh)


def test_exception_mid_forward_keeps_no_reference_to_activations():
    # A module-level activations stack would keep the encoder outputs alive after a
    # failed call (a leak, and stale entries for the next call).
    model = tiny(4).eval()
    refs: list[weakref.ref] = []
    keep = model.layers[0].register_forward_hook(lambda m, i, o: refs.append(weakref.ref(o)))

    def fail(module, inputs, output):
        raise RuntimeError("injected failure")

    fail_handle = model.layers[9].register_forward_hook(fail)
    try:
        with torch.no_grad():
            model(torch.rand(1, 3, 16, 16))
    except RuntimeError:
        pass
    finally:
        keep.remove()
        fail_handle.remove()
    gc.collect()
    assert len(refs) == 1
    assert refs[0]() is None
    assert not any(isinstance(v, list) for v in vars(model).values())


def test_two_threads_share_one_eval_model():
    model = tiny(4, n_features=6).eval()
    gen = torch.Generator().manual_seed(1)
    inputs = [torch.rand(2, 3, 32, 32, generator=gen) for _ in range(2)]
    with torch.no_grad():
        expected = [model(x) for x in inputs]
    assert not torch.equal(expected[0], expected[1])
    iterations = 5
    barrier = threading.Barrier(2)
    results: list[list[torch.Tensor]] = [[], []]
    errors: list[BaseException] = []

    def worker(k: int) -> None:
        try:
            for _ in range(iterations):
                barrier.wait(timeout=30)
                with torch.no_grad():
                    results[k].append(model(inputs[k]))
        except BaseException as e:  # reported in the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert errors == []
    for k in range(2):
        assert len(results[k]) == iterations
        assert all(torch.equal(r, expected[k]) for r in results[k])


def test_calling_layers_directly_raises():
    model = tiny(3)
    with pytest.raises(RuntimeError, match=r"UNet\.forward"):
        model.layers(torch.rand(1, 3, 16, 16))


def test_deepcopy_gives_same_output_and_independent_weights():
    model = tiny(4).eval()
    clone = copy.deepcopy(model)
    x = torch.rand(2, 3, 20, 28)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
        clone.layers[13].bias.add_(1.0)
        torch.testing.assert_close(clone(x), model(x) + 1.0, rtol=0, atol=1e-5)


def test_from_config_round_trip():
    cfg = ModelConfig(in_channels=2, out_channels=1, n_features=4, depth=3, features=(4, 6, 8))
    model = UNet.from_config(cfg)
    assert model.config == cfg
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert model.divisor == 4


def test_state_dict_keys_match_original_checkpoint(seed_checkpoint):
    original = torch.load(seed_checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    ours = UNet(in_channels=3, out_channels=1, n_features=32, depth=4).state_dict()
    assert list(ours) == list(original)
    assert {k: tuple(v.shape) for k, v in ours.items()} == {
        k: tuple(v.shape) for k, v in original.items()}


def test_fuse_batchnorm_matches_the_unfused_model():
    from tumorseg.graphs import fuse_batchnorm

    torch.manual_seed(0)
    model = UNet(n_features=6, depth=3, features=(4, 6, 8)).eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # non-trivial statistics, or fusion is a no-op
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    fused = fuse_batchnorm(model)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in fused.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())  # original untouched
    x = torch.randn(2, 3, 20, 28)
    with torch.no_grad():
        torch.testing.assert_close(fused(x), model(x), rtol=1e-4, atol=1e-5)
