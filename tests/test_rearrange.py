"""Filter rearrangement: the permuted network computes the same function, and exactly the provably safe layers move.

Each torchvision model (and our MobileNet-V1) gets random batch-norm statistics and biases (identity batch
norms would hide a missed permutation), runs in float64, eval mode, and must give the same logits after
:func:`pruning.rearrange.rearrange_filters`. Which layers can be rearranged is derived here independently
from the architecture (the ``use_res_connect`` flags of the inverted-residual blocks, ResNet's bottleneck
structure) and compared with what the fx analysis finds.
"""
from __future__ import annotations

import copy
import logging

import pytest
import torch
import torchvision
from torch import nn

from pruning.block_masks import is_depthwise, model_masks, prunable_layers
from pruning.rearrange import filter_order, find_channel_spaces, rearrange_filters

pytestmark = pytest.mark.usefixtures("one_thread")  # small inputs on a busy machine: one torch thread


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random batch-norm affine parameters and running statistics, random biases; float64, eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.num_features, generator=generator))
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator))
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
            elif isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator))
    return model.double().eval()


def mobilenet_v1() -> nn.Module:
    module = pytest.importorskip("models.mobilenet_v1", reason="models/mobilenet_v1.py is not there yet")
    return module.mobilenet_v1()


def expected_leads_inverted_residual(model: nn.Module) -> set[str]:
    """Leads of MobileNet-V2/V3 by hand: a block's output can be permuted unless it or the next block adds a residual.

    Always permutable: expansion convolutions (through the depthwise convolution to the projection), the
    squeeze-excitation's ``fc1`` (to ``fc2``), the last 1x1 convolution (through pooling to the classifier) and,
    in MobileNet-V3, the classifier's first linear layer. The stem and each projection are permutable when
    neither the block they end nor the block they feed has a residual connection.
    """
    _stem, *blocks, _last = model.features
    leads = {f"features.{len(model.features) - 1}.0"}
    if not blocks[0].use_res_connect:
        leads.add("features.0.0")
    for index, block in enumerate(blocks, start=1):
        convs = [name for name, module in block.named_modules() if isinstance(module, nn.Conv2d)]
        first = block.get_submodule(convs[0])
        if not is_depthwise(first):
            leads.add(f"features.{index}.{convs[0]}")
        leads.update(f"features.{index}.{name}" for name in convs if name.endswith("fc1"))
        next_residual = index < len(blocks) and blocks[index].use_res_connect
        if not block.use_res_connect and not next_residual:
            leads.add(f"features.{index}.{convs[-1]}")
    if len(model.classifier) == 4:  # MobileNet-V3: Linear, Hardswish, Dropout, Linear
        leads.add("classifier.0")
    return leads


def expected_leads_resnet(model: nn.Module) -> set[str]:
    """ResNet bottlenecks: ``conv1`` and ``conv2`` of every block, and the stem (to the first block and its downsampling)."""
    leads = {"conv1"}
    for name, module in model.named_modules():
        if isinstance(module, torchvision.models.resnet.Bottleneck):
            leads.update({f"{name}.conv1", f"{name}.conv2"})
    return leads


MODELS = {
    "mobilenet_v1": (mobilenet_v1, None),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(weights=None), expected_leads_inverted_residual),
    "mobilenet_v3_small": (lambda: torchvision.models.mobilenet_v3_small(weights=None), expected_leads_inverted_residual),
    "mobilenet_v3_large": (lambda: torchvision.models.mobilenet_v3_large(weights=None), expected_leads_inverted_residual),
    "resnet50": (lambda: torchvision.models.resnet50(weights=None), expected_leads_resnet),
}


def reference_order(weight: torch.Tensor) -> list[int]:
    norms = weight.detach().abs().reshape(weight.shape[0], -1).sum(dim=1).tolist()
    return sorted(range(len(norms)), key=lambda c: (-norms[c], c))


def test_filter_order_sorts_by_descending_l1_norm_with_ties_in_index_order() -> None:
    weight = torch.randn(12, 3, 3, 3, dtype=torch.float64)
    weight[7] = -weight[2]  # equal norms: 2 before 7
    weight[9] = weight[4]
    assert filter_order(weight).tolist() == reference_order(weight)
    assert filter_order(torch.ones(5, 4)).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(MODELS))
def test_rearranged_network_computes_the_same_function(name: str) -> None:
    build, expected_leads = MODELS[name]
    model = randomize(build())
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    orders = {name: reference_order(layer.weight) for name, layer in model.named_modules() if hasattr(layer, "weight")}
    expected = None if expected_leads is None else expected_leads(model)
    rearrangements = rearrange_filters(model)
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-10)

    leads = {r.space.lead for r in rearrangements}
    if expected is not None:
        assert leads == expected
    else:  # MobileNet-V1: the stem and the 13 pointwise convolutions; the classifier feeds the output
        assert leads == {"conv_stem", *(f"blocks.{i}.conv_pw" for i in range(13))}
    moved = 0
    for rearrangement in rearrangements:
        lead = rearrangement.space.lead
        assert rearrangement.order.tolist() == orders[lead]
        norms = model.get_submodule(lead).weight.abs().reshape(len(orders[lead]), -1).sum(dim=1)
        assert (norms[:-1] >= norms[1:]).all(), f"{lead}: filters not sorted by L1 norm after rearrangement"
        moved += rearrangement.order.tolist() != sorted(orders[lead])
    assert moved == len(rearrangements)  # random weights: every order is a real permutation


def test_squeeze_excitation_gates_follow_their_expansion_convolution() -> None:
    model = torchvision.models.mobilenet_v3_small(weights=None)
    spaces, unsafe = find_channel_spaces(model)
    fc2 = [name for name, _ in model.named_modules() if name.endswith(".fc2")]
    gated = {space.producers[1]: space for space in spaces if len(space.producers) == 2}
    assert sorted(gated) == sorted(fc2)  # every SE's fc2 is a second producer, none is a lead or unsafe
    assert all(len(space.producers) <= 2 for space in spaces) and not set(fc2) & set(unsafe)
    space = gated["features.4.block.2.fc2"]
    assert space.producers == ("features.4.block.0.0", "features.4.block.2.fc2")
    assert space.passthrough == ("features.4.block.0.1", "features.4.block.1.0", "features.4.block.1.1")
    assert space.consumers == ("features.4.block.2.fc1", "features.4.block.3.0")
    assert "addition" in unsafe["features.4.block.3.0"]  # features.5 adds a residual to it


@pytest.mark.slow
def test_one_by_n_masks_of_the_rearranged_network_map_back_to_the_original() -> None:
    """Pruning the rearranged network = pruning the original with the masks permuted back.

    In the rearranged network the masks are 1xN patterns of the stored weights, and block row ``r`` of a
    lead holds its filters ranked ``rN .. rN + N - 1`` by L1 norm (the lead is sorted, see above). Mapped
    back to the original layout, the masks of every layer whose rows were permuted are no 1xN pattern any
    more (their rows are scattered): the network itself has to be permuted for a block-sparse kernel.
    """
    block_size = 4
    model = randomize(torchvision.models.mobilenet_v2(weights=None))
    original = copy.deepcopy(model)
    layers = list(prunable_layers(model))
    rearrangements = rearrange_filters(model, layers)
    masks = model_masks(model, "1xn", 0.5, block_size=block_size)
    row_order: dict[str, torch.Tensor] = {}
    column_order: dict[str, torch.Tensor] = {}
    for rearrangement in rearrangements:
        row_order.update(dict.fromkeys(rearrangement.space.producers, rearrangement.order))
        column_order.update(dict.fromkeys(rearrangement.space.consumers, rearrangement.order))
    with torch.no_grad():
        for name, mask in masks.items():
            original_mask = mask.clone()
            if name in row_order:  # stored row i is original row order[i]
                original_mask[row_order[name]] = mask
            if name in column_order:  # stored column j is original column order[j]
                original_mask[:, column_order[name]] = original_mask.clone()
            # column permutations keep 1xN blocks (one input channel each), row permutations scatter them
            assert is_one_by_n_pattern(original_mask, block_size) == (name not in row_order), name
            model.get_submodule(name).weight.mul_(mask)
            original.get_submodule(name).weight.mul_(original_mask)
    assert len(set(masks) & set(row_order)) >= 19  # 16 expansions, 2 projections, the last 1x1 convolution
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model(x), original(x), rtol=1e-10, atol=1e-10)


def is_one_by_n_pattern(mask: torch.Tensor, block_size: int) -> bool:
    """Whether every block of ``block_size`` consecutive output channels x 1 input channel is all kept or all pruned."""
    per_kernel = mask.reshape(mask.shape[0], mask.shape[1], -1).all(dim=2)
    whole = mask.shape[0] // block_size * block_size
    blocks = per_kernel[:whole].reshape(-1, block_size, mask.shape[1])
    return bool((blocks.all(dim=1) | ~blocks.any(dim=1)).all())


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.bn(self.conv(x)))


class Concatenation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.left(x), self.right(x)], dim=1))


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(torch.relu(self.conv(x))))


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encode, self.decode = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
        self.decode.weight = self.encode.weight
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.decode(torch.relu(self.encode(x))))


class SpatialAttention(nn.Module):
    """``x * sigmoid(conv(x))`` with a one-channel gate: a product broadcast over channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.gate = nn.Conv2d(4, 1, 1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return self.head(y * torch.sigmoid(self.gate(y)))


class FlattenWithoutPooling(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4 * 2 * 2, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.conv(x), 1))


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if x.sum() > 0 else x


@pytest.mark.parametrize(
    "model, layer, reason",
    [
        (Residual(), "conv", "an addition"),
        (Concatenation(), "left", "a concatenation"),
        (SharedConv(), "conv", "called more than once"),
        (TiedWeights(), "encode", "shares parameters"),
        (SpatialAttention(), "conv", "different channel counts"),
        (FlattenWithoutPooling(), "conv", "flatten"),
    ],
)
def test_unsafe_layers_are_left_alone_with_a_reason(model: nn.Module, layer: str, reason: str) -> None:
    spaces, unsafe = find_channel_spaces(model)
    assert layer not in {name for space in spaces for name in space.producers}
    assert reason in unsafe[layer]
    with pytest.raises(ValueError, match="nothing to rearrange") as error:
        rearrange_filters(model, [layer])
    assert "\n" not in str(error.value)


def test_an_architecture_with_nothing_permutable_is_one_value_error() -> None:
    with pytest.raises(ValueError, match=r"nothing to rearrange in Residual: .*conv: its channels reach an addition"):
        rearrange_filters(Residual())
    with pytest.raises(ValueError, match="cannot trace DataDependent with torch.fx"):
        rearrange_filters(DataDependent())


def test_the_permutable_part_of_a_mixed_model_is_rearranged_and_the_rest_logged(caplog) -> None:
    model = nn.Sequential(
        nn.Conv2d(3, 8, 1), nn.BatchNorm2d(8), nn.ReLU(),  # 0 -> 3: permutable
        nn.Conv2d(8, 6, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 5),  # 3 -> 6 permutable
    )
    model = randomize(model)
    lead_weight = model[0].weight.detach().clone()
    x = torch.randn(3, 3, 5, 5, dtype=torch.float64)
    before = model(x).detach()
    with caplog.at_level(logging.INFO, logger="pruning.rearrange"):
        rearrangements = rearrange_filters(model, ["0", "6"])
    assert [r.space for r in rearrangements] == [find_channel_spaces(model)[0][0]]
    assert rearrangements[0].space.consumers == ("3",) and rearrangements[0].space.passthrough == ("1",)
    assert rearrangements[0].order.tolist() == reference_order(lead_weight)
    assert "skips 6: its channels reach the model's output" in caplog.text
    torch.testing.assert_close(model(x).detach(), before, rtol=1e-12, atol=1e-12)
