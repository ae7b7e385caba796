"""Filter rearrangement for 1xN pruning: sort a layer's output filters by L1 norm by permuting the network.

Lin et al. (1xN pruning, TPAMI 2022) sort a layer's output filters by L1 norm so that each 1xN block
(``N`` consecutive output channels, see :mod:`pruning.block_masks`) groups filters of similar norm. For the
stored weights to hold those blocks, the network itself is permuted: with ``order`` the descending, stable
argsort of the filter norms ``||W[c, ...]||_1`` (:func:`filter_order`), new channel ``i`` is old channel
``order[i]`` in

* the layer's weight rows and bias (the *producers*),
* every per-channel layer on the way to the next weight layers (*pass-through*: batch norms, weight,
  bias, running mean and variance; depthwise convolutions, weight rows and bias),
* the input channels (weight columns) of the next convolutions or linear layers (the *consumers*).

The network then computes the same function (up to float rounding: sums run in another order).

Which layers can be permuted is proven on the dataflow graph (:func:`torch.fx.symbolic_trace`): starting
from a producer's output, the set of values that carry its channels (the *channel space*) is closed
forward (every use of such a value) and backward (the inputs it is computed from), and every operation
touching it must be one of

* channel-wise with a single tensor input: activations, dropout, element-wise arithmetic with a constant,
  pooling (a global pool to 1x1 may be followed by ``flatten(1)``, after which a linear layer consumes the
  channels), batch norm, a depthwise convolution with one output channel per input channel;
* a consumer: a ``groups = 1`` convolution or a linear layer that takes the value as its input;
* a product of two values of the space (broadcast over space, the same channel count), the
  squeeze-excitation gate ``x * sigmoid(fc2(relu(fc1(pool(x)))))``: ``fc1`` is then a consumer, and ``fc2``,
  whose output enters the product, a second producer (its rows and bias follow the same order).
  Squeeze-excitation is therefore handled, not skipped: MobileNet-V3's expansion convolutions are
  rearranged together with their SE block (and ``fc1 -> fc2`` is a chain of its own).

Anything else makes the space unsafe, and its layers are left alone: an addition (a residual
connection), a concatenation, the model's output, a reshape, a module called twice or sharing parameters
(tied weights), a grouped (not depthwise) convolution. For the chain the paper describes, ``conv -> [bn]
-> [act] -> ([dw conv -> [bn] -> [act]])* -> conv / linear``, this is exactly the rule; it also admits
several consumers of one value (ResNet's stem feeds both the first block and its downsampling path).
Inputs are assumed batched (``(B, C, ...)``): channels are axis 1, and axis 1 = the last axis after
``flatten(1)``.

When a space has two producers (squeeze-excitation), its *lead*, whose norms set the order, is the first
producer in execution order (the expansion convolution, not the SE's ``fc2``).

Apply the rearrangement to a float model before masks or quantizers are attached (their layers are
traced through, not recognised, so they would be reported unsafe anyway).
"""
from __future__ import annotations

import enum
import logging
import operator
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from pruning.block_masks import is_depthwise

__all__ = [
    "ChannelSpace",
    "Rearrangement",
    "filter_order",
    "find_channel_spaces",
    "permute_channel_space",
    "rearrange_filters",
]

logger = logging.getLogger(__name__)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Tanh, nn.LeakyReLU,
    nn.ELU, nn.Mish, nn.Hardtanh, nn.Identity, nn.Dropout,
)  # fmt: skip
_ELEMENTWISE_FUNCTIONS = {
    F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.silu, F.gelu, F.leaky_relu, F.elu, F.mish, F.hardtanh,
    F.dropout, torch.relu, torch.sigmoid, torch.tanh,
}  # fmt: skip
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous"}
_ARITHMETIC = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub, torch.mul}
_PRODUCTS = {operator.mul, torch.mul}
_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
)  # fmt: skip
_ADAPTIVE_POOL_MODULES = (
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)  # fmt: skip
_POOL_FUNCTIONS = {F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d}
_ADAPTIVE_POOL_FUNCTIONS = {F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d}


def filter_order(weight: torch.Tensor) -> torch.Tensor:
    """Output channels by descending L1 norm ``||W[c, ...]||_1``, ties in index order (a stable sort)."""
    norms = weight.detach().abs().reshape(weight.shape[0], -1).sum(dim=1)
    return torch.argsort(norms, descending=True, stable=True)


@dataclass(frozen=True)
class ChannelSpace:
    """The layers one channel permutation must touch (module names), proven safe on the traced graph."""

    producers: tuple[str, ...]  # output channels permuted; the first one (in execution order) is the lead
    passthrough: tuple[str, ...]  # batch norms and depthwise convolutions, permuted along their channels
    consumers: tuple[str, ...]  # input channels permuted

    @property
    def lead(self) -> str:
        return self.producers[0]


@dataclass(frozen=True)
class Rearrangement:
    """A permuted channel space: new channel ``i`` of every layer in ``space`` is old channel ``order[i]``."""

    space: ChannelSpace
    order: torch.Tensor


class _Layout(enum.Enum):
    """What a traced value's axes are: ``(B, C, *spatial)``, the same with all spatial sizes 1, or ``(B, C)``."""

    SPATIAL = "spatial"
    POOLED = "pooled"
    FLAT = "flat"
    UNKNOWN = "unknown"


class _Kind(enum.Enum):
    WEIGHT_LAYER = "groups=1 convolution or linear layer"
    DEPTHWISE = "depthwise convolution"
    BATCH_NORM = "batch norm"
    ELEMENTWISE = "channel-wise operation"
    POOL = "pooling"
    GLOBAL_POOL = "global pooling"
    FLATTEN = "flatten(1)"
    PRODUCT = "product"
    OTHER = "other"


def _is_one(size: object) -> bool:
    return size == 1 or (isinstance(size, (tuple, list)) and all(s == 1 for s in size))


def _argument(node: fx.Node, index: int, name: str, default: object) -> object:
    """Argument ``index`` (positional, the input counted) or ``name`` (keyword) of a call node."""
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _modules_with_shared_state(model: nn.Module, graph: fx.Graph) -> dict[str, str]:
    """``{module name: why}`` of the modules a permutation would touch more than once.

    A module with parameters or buffers that the graph calls twice, or that shares one of them with
    another module (tied weights, one module under two names). A stateless module (an activation, a
    pool) may be reused.
    """
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for tensor in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
            owners.setdefault(id(tensor), set()).add(name)
    reasons = {name: "it shares parameters with another module" for names in owners.values() if len(names) > 1 for name in names}
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    for name, count in calls.items():
        module = model.get_submodule(name)
        stateful = any(True for _ in module.parameters()) or any(True for _ in module.buffers())
        if stateful and count > 1:
            reasons[name] = "the module is called more than once"
    return reasons


def _out_channels(layer: nn.Module) -> int:
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.num_features if isinstance(layer, _BATCH_NORMS) else layer.out_channels


def _in_channels(layer: nn.Module) -> int:
    return layer.in_features if isinstance(layer, nn.Linear) else layer.in_channels


class _Graph:
    """A traced model with each node's kind (what it does to channels) and layout (which axes it has)."""

    def __init__(self, model: nn.Module) -> None:
        try:
            self.graph = fx.symbolic_trace(model).graph
        except Exception as error:  # fx raises many types on untraceable code
            message = str(error).splitlines()[0] if str(error) else ""
            raise ValueError(
                f"cannot trace {type(model).__name__} with torch.fx ({type(error).__name__}: {message}), "
                "so no channel permutation can be proven safe"
            ) from error
        self.model = model
        self.unpermutable = _modules_with_shared_state(model, self.graph)
        self.position = {node: index for index, node in enumerate(self.graph.nodes)}
        self.kind = {node: self._classify(node) for node in self.graph.nodes}
        self.layout: dict[fx.Node, _Layout] = {}
        for node in self.graph.nodes:  # topological order: inputs first
            self.layout[node] = self._infer_layout(node)

    def module(self, node: fx.Node) -> nn.Module:
        return self.model.get_submodule(node.target)

    def _classify(self, node: fx.Node) -> _Kind:
        inputs = node.all_input_nodes
        if node.op == "call_module":
            if node.target in self.unpermutable or len(inputs) != 1 or len(node.args) != 1 or node.kwargs:
                return _Kind.OTHER
            module = self.module(node)
            if isinstance(module, nn.Linear) or (isinstance(module, _CONVS) and module.groups == 1):
                return _Kind.WEIGHT_LAYER
            if is_depthwise(module) and module.out_channels == module.in_channels:
                return _Kind.DEPTHWISE
            if isinstance(module, _BATCH_NORMS):
                return _Kind.BATCH_NORM
            if isinstance(module, _ELEMENTWISE_MODULES):
                return _Kind.ELEMENTWISE
            if isinstance(module, _POOL_MODULES):
                return _Kind.POOL
            if isinstance(module, _ADAPTIVE_POOL_MODULES):
                return _Kind.GLOBAL_POOL if _is_one(module.output_size) else _Kind.POOL
            if isinstance(module, nn.Flatten):
                return _Kind.FLATTEN if (module.start_dim, module.end_dim) == (1, -1) else _Kind.OTHER
            return _Kind.OTHER
        if node.op == "call_function":
            if node.target in _PRODUCTS and len(inputs) == 2:
                return _Kind.PRODUCT
            if len(inputs) != 1 or not node.args or not isinstance(node.args[0], fx.Node):
                return _Kind.OTHER
            if node.target in _ELEMENTWISE_FUNCTIONS:
                return _Kind.ELEMENTWISE
            if node.target in _ARITHMETIC and all(isinstance(a, (int, float, fx.Node)) for a in node.args):
                return _Kind.ELEMENTWISE  # x + 3, x * 0.5: the other operand is a number
            if node.target in _POOL_FUNCTIONS:
                return _Kind.POOL
            if node.target in _ADAPTIVE_POOL_FUNCTIONS:
                return _Kind.GLOBAL_POOL if _is_one(_argument(node, 1, "output_size", None)) else _Kind.POOL
            if node.target is torch.flatten:
                return self._flatten_kind(node)
            return _Kind.OTHER
        if node.op == "call_method":
            if node.target == "mul" and len(inputs) == 2:
                return _Kind.PRODUCT
            if len(inputs) != 1 or not node.args or not isinstance(node.args[0], fx.Node):
                return _Kind.OTHER
            if node.target in _ELEMENTWISE_METHODS:
                return _Kind.ELEMENTWISE
            if node.target == "flatten":
                return self._flatten_kind(node)
        return _Kind.OTHER

    @staticmethod
    def _flatten_kind(node: fx.Node) -> _Kind:
        dims = (_argument(node, 1, "start_dim", 0), _argument(node, 2, "end_dim", -1))
        return _Kind.FLATTEN if dims == (1, -1) else _Kind.OTHER

    def _infer_layout(self, node: fx.Node) -> _Layout:
        kind = self.kind[node]
        inputs = [self.layout[i] for i in node.all_input_nodes]
        if kind is _Kind.WEIGHT_LAYER:
            if isinstance(self.module(node), nn.Linear):
                return _Layout.FLAT if inputs[0] is _Layout.FLAT else _Layout.UNKNOWN
            return _Layout.SPATIAL
        if kind is _Kind.DEPTHWISE:
            return _Layout.SPATIAL
        if kind in (_Kind.BATCH_NORM, _Kind.ELEMENTWISE):
            return inputs[0]
        if kind in (_Kind.POOL, _Kind.GLOBAL_POOL):
            if inputs[0] not in (_Layout.SPATIAL, _Layout.POOLED):
                return _Layout.UNKNOWN
            return _Layout.POOLED if kind is _Kind.GLOBAL_POOL else _Layout.SPATIAL
        if kind is _Kind.FLATTEN:
            return _Layout.FLAT if inputs[0] in (_Layout.POOLED, _Layout.FLAT) else _Layout.UNKNOWN
        if kind is _Kind.PRODUCT:
            if set(inputs) <= {_Layout.SPATIAL, _Layout.POOLED}:
                return _Layout.SPATIAL if _Layout.SPATIAL in inputs else _Layout.POOLED
            return _Layout.FLAT if set(inputs) == {_Layout.FLAT} else _Layout.UNKNOWN
        return _Layout.UNKNOWN

    def describe(self, node: fx.Node) -> str:
        if node.op == "call_module":
            return f"{node.target} ({type(self.module(node)).__name__})"
        if node.op == "output":
            return "the model's output"
        if node.op == "placeholder":
            return f"the model's input {node.name}"
        if node.target in (operator.add, torch.add, operator.iadd):
            return f"an addition {node.name} (a residual connection)"
        if node.target is torch.cat:
            return f"a concatenation {node.name}"
        return f"{node.op} {getattr(node.target, '__name__', node.target)} ({node.name})"

    def consumes(self, user: fx.Node, value: fx.Node) -> bool:
        """Whether ``user`` is a weight layer taking ``value`` as its input, with the channels where it reads them."""
        if self.kind[user] is not _Kind.WEIGHT_LAYER:
            return False
        linear = isinstance(self.module(user), nn.Linear)
        return self.layout[value] in ((_Layout.FLAT,) if linear else (_Layout.SPATIAL, _Layout.POOLED))

    def channel_space(self, producer: fx.Node) -> ChannelSpace | str:
        """The channel space of ``producer``'s output, or why it is unsafe (see the module docstring)."""
        space = {producer}
        stack = [producer]
        producers, passthrough, consumers = [], [], []
        while stack:
            value = stack.pop()
            kind = self.kind[value]
            if self.layout[value] is _Layout.UNKNOWN:
                return f"the channel axis of {self.describe(value)} is not known"
            # how the value is computed: every input that carries the channels joins the space
            if kind is _Kind.WEIGHT_LAYER:
                producers.append(value)
                inputs = []
            elif kind in (_Kind.DEPTHWISE, _Kind.BATCH_NORM):
                passthrough.append(value)
                inputs = value.all_input_nodes
            elif kind in (_Kind.ELEMENTWISE, _Kind.POOL, _Kind.GLOBAL_POOL, _Kind.FLATTEN, _Kind.PRODUCT):
                inputs = value.all_input_nodes
            else:
                return f"its channels come from {self.describe(value)}, which is not channel-wise"
            # how the value is used: consumers stop the space, channel-wise users join it
            for user in value.users:
                if self.consumes(user, value):
                    consumers.append(user)
                elif self.kind[user] in (_Kind.WEIGHT_LAYER, _Kind.OTHER):
                    return f"its channels reach {self.describe(user)}"
                else:
                    inputs = [*inputs, user]
            for node in inputs:
                if node not in space:
                    space.add(node)
                    stack.append(node)
        channels = {_out_channels(self.module(node)) for node in producers + passthrough}
        channels |= {_in_channels(self.module(node)) for node in consumers}
        if len(channels) > 1:
            return f"its layers have different channel counts {sorted(channels)} (a product broadcast over channels?)"

        def names(nodes: list[fx.Node]) -> tuple[str, ...]:
            return tuple(node.target for node in sorted(set(nodes), key=self.position.__getitem__))

        return ChannelSpace(names(producers), names(passthrough), names(consumers))


def find_channel_spaces(model: nn.Module) -> tuple[list[ChannelSpace], dict[str, str]]:
    """The permutable channel spaces of ``model`` (in execution order of their leads), and ``{layer: why not}``.

    Every ``groups = 1`` convolution and linear layer called once is either a producer of one space or
    listed with the reason its output cannot be permuted. Raises ``ValueError`` if ``model`` does not trace.
    """
    graph = _Graph(model)
    spaces: list[ChannelSpace] = []
    unsafe: dict[str, str] = {}
    covered: set[str] = set()
    for node in graph.graph.nodes:
        if graph.kind[node] is not _Kind.WEIGHT_LAYER or node.target in covered:
            continue
        result = graph.channel_space(node)
        if isinstance(result, str):
            unsafe[node.target] = result
            continue
        spaces.append(result)
        covered.update(result.producers)
    for name, why in graph.unpermutable.items():
        if isinstance(model.get_submodule(name), (nn.Linear, *_CONVS)):
            unsafe[name] = why
    return spaces, unsafe


def _permute_(tensor: torch.Tensor | None, order: torch.Tensor, dim: int) -> None:
    if tensor is not None:
        tensor.copy_(tensor.index_select(dim, order.to(tensor.device)))


@torch.no_grad()
def permute_channel_space(model: nn.Module, space: ChannelSpace, order: torch.Tensor) -> None:
    """Permute in place every layer of ``space``: new channel ``i`` = old channel ``order[i]`` (parameters keep their identity)."""
    for name in space.producers:
        layer = model.get_submodule(name)
        _permute_(layer.weight, order, 0)
        _permute_(layer.bias, order, 0)
    for name in space.passthrough:
        layer = model.get_submodule(name)
        for tensor in (layer.weight, layer.bias, getattr(layer, "running_mean", None), getattr(layer, "running_var", None)):
            _permute_(tensor, order, 0)
    for name in space.consumers:
        _permute_(model.get_submodule(name).weight, order, 1)


def rearrange_filters(model: nn.Module, layer_names: Iterable[str] | None = None) -> list[Rearrangement]:
    """Sort the filters of ``layer_names`` (default: every permutable layer) by L1 norm, permuting ``model`` in place.

    Each permutable space whose lead is in ``layer_names`` gets ``order = filter_order(lead.weight)``.
    Requested layers that cannot be rearranged are logged with the reason and left alone; if none can,
    one ``ValueError``.
    """
    spaces, unsafe = find_channel_spaces(model)
    requested = None if layer_names is None else list(dict.fromkeys(layer_names))
    chosen = spaces if requested is None else [space for space in spaces if space.lead in requested]
    if requested is not None:
        leads = {space.lead for space in chosen}
        followers = {name: space.lead for space in spaces for name in space.producers[1:]}
        for name in requested:
            if name in leads:
                continue
            if name in followers:
                why = f"its channels follow {followers[name]!r} (a squeeze-excitation gate)"
            else:
                why = unsafe.get(name, "not a convolution or linear layer of the traced graph")
            logger.info("filter rearrangement skips %s: %s", name, why)
    if not chosen:
        examples = "; ".join(f"{name}: {why}" for name, why in list(unsafe.items())[:2])
        raise ValueError(f"nothing to rearrange in {type(model).__name__}: no requested layer can be permuted ({examples})")
    rearrangements = []
    for space in chosen:
        order = filter_order(model.get_submodule(space.lead).weight)
        permute_channel_space(model, space, order)
        rearrangements.append(Rearrangement(space, order))
    logger.info("filter rearrangement: %d channel spaces permuted; %d weight layers cannot be", len(chosen), len(unsafe))
    return rearrangements
