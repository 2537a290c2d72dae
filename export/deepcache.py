"""DeepCache traced into two UNets (``sdengine export --deepcache BRANCH``; ``sdengine.deepcache``).

DeepCache (Ma et al. 2024, "DeepCache: Accelerating Diffusion Models for Free") runs the whole UNet only
every few steps; the steps between run its shallow branch alone, and take the deep layers' contribution from
the last whole step. As the authors' ``DeepCacheSDHelper`` numbers it, branch ``3 * block + layer`` keeps,
counted from the UNet's ends, the down blocks before ``block``, the first ``layer`` layers of down block
``block``, the last ``layer + 1`` layers of the matching up block and every up block after it; the rest (the
middle block included) is skipped, and what it fed into the kept up layers -- the hidden states entering
layer ``layer`` of up block ``block``, before its skip connection is concatenated -- is the cached feature.

Two models are traced from the same UNet export wrapper (ControlNets, an IP-Adapter, PAG's layers and a
guidance embedding included):

- ``unet``: the whole UNet, which also gives that feature (``deepcache_feature``);
- ``unet_shallow``: the kept layers alone, which take the feature as their last input. What only the skipped
  blocks read is left out of its graph: ControlNets' deeper residuals with the layers that make them, so a
  ControlNet costs the shallow call little, where diffusers with the helper runs it whole on every call.

The kept blocks' layers run through diffusers' own modules; only the up block that the branch cuts and, where
the branch cuts a down block, that down block, run through :func:`_up_block_forward` and
:func:`_down_block_forward` here, which follow diffusers' ``CrossAttnUpBlock2D``/``UpBlock2D`` and
``...DownBlock2D`` forwards layer for layer. Skipped blocks return placeholders that nothing kept reads.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
from onnx import helper
from torch import nn

from export.records import write_record
from export.wrappers import exported_component
from sdengine.deepcache import DEEPCACHE_CONFIG, CacheBranch
from sdengine.errors import InvalidArgumentError, UnsupportedConfigError
from sdengine.freeu import FREEU_SCALES
from sdengine.model_specs import Architecture, ModelSpec

#: The up and down block classes whose forwards :func:`_up_block_forward` and :func:`_down_block_forward`
#: follow (SD 1.x/2.x's and SDXL's).
UP_BLOCKS = ("CrossAttnUpBlock2D", "UpBlock2D")
DOWN_BLOCKS = ("CrossAttnDownBlock2D", "DownBlock2D")


@dataclass(frozen=True)
class BranchShape:
    """Where a branch cuts a UNet, in diffusers' indices, and the cached feature's channels and downscale
    (the latents' size over the feature's)."""

    up: int  # index into unet.up_blocks
    first_kept: int  # the first of the cut up block's layers that runs on the feature
    channels: int
    downscale: int


def branch_shape(unet: nn.Module, branch: CacheBranch) -> BranchShape:
    """Check ``branch`` against ``unet`` (InvalidArgumentError, naming the branches it has) and say where it
    cuts it."""
    blocks = len(unet.up_blocks)
    layers = [len(b.resnets) for b in reversed(unet.up_blocks)]  # counted from the output end
    valid = [3 * b + l for b in range(blocks) for l in range(min(layers[b], 3))]  # noqa: E741
    if branch.branch_id not in valid:
        raise InvalidArgumentError(
            f"DeepCache branch {branch.branch_id} is not in this UNet; choose one of "
            f"{', '.join(map(str, valid))} (0: the shallowest, fastest)"
        )
    up = blocks - 1 - branch.block
    up_block, down_block = unet.up_blocks[up], unet.down_blocks[branch.block]
    for block, known in ((up_block, UP_BLOCKS), (down_block, DOWN_BLOCKS)):
        if type(block).__name__ not in known:
            raise InvalidArgumentError(
                f"DeepCache would cut a {type(block).__name__}, which sdengine does not know: choose "
                "another branch"
            )
    first_kept = len(up_block.resnets) - 1 - branch.layer
    resnet = up_block.resnets[first_kept]
    skip_channels = _skip_channels(unet, branch)
    channels = resnet.conv1.in_channels - skip_channels
    downscale = 2 ** sum(1 for b in unet.down_blocks[: branch.block] if b.downsamplers)
    return BranchShape(up, first_kept, channels, downscale)


def check_controlled_branch(shape: BranchShape, branch: CacheBranch, controlnets: bool) -> None:
    """With ControlNets, refuse the one branch whose feature is the middle block's output: a ControlNet adds
    its middle residual to that output on every call, which the authors' helper adds to the cached output
    afresh, where the whole UNet's feature holds the residual of its own call. Every other branch's feature
    is an up block's, after every residual it reads."""
    if controlnets and shape.up == 0 and shape.first_kept == 0:
        raise UnsupportedConfigError(
            f"DeepCache branch {branch.branch_id} caches the middle block's output, to which ControlNets add "
            "their residual on every call: choose a lower branch to run it with ControlNets"
        )


def _skip_channels(unet: nn.Module, branch: CacheBranch) -> int:
    """The channels of the skip connection that the first kept up layer concatenates: the output of the
    down block's layer before the cut, or what entered the down block (``conv_in``'s output for block 0)."""
    down_block = unet.down_blocks[branch.block]
    if branch.layer > 0:
        return down_block.resnets[branch.layer - 1].out_channels
    return down_block.resnets[0].in_channels


class _Slot:
    """The feature, handed between the cut up block and the export wrapper within one call."""

    def __init__(self) -> None:
        self.feature: torch.Tensor | None = None


def _placeholder() -> torch.Tensor:
    """What a skipped block returns: read by nothing kept, so the traced graph drops it."""
    return torch.zeros(())


def _attention(attentions: Any, index: int, hidden: torch.Tensor, kwargs: dict[str, Any]) -> torch.Tensor:
    """A block's attention ``index`` on ``hidden``, called as diffusers' blocks call it (none: as it is)."""
    if attentions is None:
        return hidden
    return attentions[index](
        hidden,
        encoder_hidden_states=kwargs.get("encoder_hidden_states"),
        cross_attention_kwargs=kwargs.get("cross_attention_kwargs"),
        attention_mask=kwargs.get("attention_mask"),
        encoder_attention_mask=kwargs.get("encoder_attention_mask"),
        return_dict=False,
    )[0]


def _up_block_forward(block: nn.Module, first_kept: int, slot: _Slot, shallow: bool) -> Any:
    """The cut up block's forward: every layer, keeping the hidden states entering ``first_kept`` in
    ``slot`` (the whole UNet); or the layers from ``first_kept`` on, starting from ``slot``'s feature
    (the shallow one)."""

    def forward(
        hidden_states: torch.Tensor,
        res_hidden_states_tuple: tuple[torch.Tensor, ...],
        temb: torch.Tensor | None = None,
        upsample_size: Any = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        from diffusers.models.unets import unet_2d_blocks  # its apply_freeu: export.freeu's while traced

        attentions = getattr(block, "attentions", None)
        scales = {name: getattr(block, name, None) for name in FREEU_SCALES}  # FreeU's, where set
        layers = len(block.resnets)
        start = first_kept if shallow else 0
        if shallow:
            hidden_states = slot.feature
        for i in range(start, layers):
            if i == first_kept and not shallow:
                slot.feature = hidden_states
            skip = res_hidden_states_tuple[layers - 1 - i]  # the layers pop the tuple from its end
            if all(scales.values()):  # after the feature is kept: the helper caches inside diffusers' block
                hidden_states, skip = unet_2d_blocks.apply_freeu(
                    block.resolution_idx, hidden_states, skip, **scales
                )
            hidden_states = block.resnets[i](torch.cat([hidden_states, skip], dim=1), temb)
            hidden_states = _attention(attentions, i, hidden_states, kwargs)
        for upsampler in block.upsamplers or ():
            hidden_states = upsampler(hidden_states, upsample_size)
        return hidden_states

    return forward


def _down_block_forward(block: nn.Module, kept: int) -> Any:
    """A down block of which the shallow UNet keeps the first ``kept`` layers (0: a skipped block): their
    outputs, and placeholders for the skipped layers' and the downsampler's."""
    outputs = len(block.resnets) + (1 if block.downsamplers else 0)

    def forward(hidden_states: torch.Tensor, temb: torch.Tensor | None = None, **kwargs: Any) -> tuple:
        if kwargs.get("additional_residuals") is not None:
            raise InvalidArgumentError("DeepCache with a T2I-Adapter is not supported")
        attentions = getattr(block, "attentions", None)
        states: tuple[torch.Tensor, ...] = ()
        for i in range(kept):
            hidden_states = _attention(attentions, i, block.resnets[i](hidden_states, temb), kwargs)
            states += (hidden_states,)
        return _placeholder(), states + (_placeholder(),) * (outputs - kept)

    return forward


def _skipped(*args: Any, **kwargs: Any) -> torch.Tensor:
    return _placeholder()


class DeepCacheUNetExport(nn.Module):
    """A UNet export wrapper (``inner``, from ``export.wrappers``) cut at a DeepCache branch. The whole
    UNet (``shallow`` False) gives its output and the cached feature; the shallow one takes the feature as
    its last input and gives its output. The blocks' forwards are replaced on the UNet's modules themselves
    (instance attributes), so the UNet's layers keep their names (``export.weight_names``)."""

    def __init__(
        self, inner: nn.Module, unet: nn.Module, branch: CacheBranch, shape: BranchShape, *, shallow: bool
    ) -> None:
        super().__init__()
        self.inner, self.shallow, self.slot = inner, shallow, _Slot()
        cut = unet.up_blocks[shape.up]
        cut.forward = _up_block_forward(cut, shape.first_kept, self.slot, shallow)
        if not shallow:
            return
        for i, block in enumerate(unet.down_blocks[branch.block :], start=branch.block):
            block.forward = _down_block_forward(block, branch.layer if i == branch.block else 0)
        unet.mid_block.forward = _skipped
        for block in unet.up_blocks[: shape.up]:
            block.forward = _skipped

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | torch.Tensor:
        if self.shallow:
            *others, self.slot.feature = inputs
            try:
                return self.inner(*others)
            finally:
                self.slot.feature = None
        self.slot.feature = None
        out = self.inner(*inputs)
        feature, self.slot.feature = self.slot.feature, None
        if feature is None:
            raise RuntimeError("DeepCache's cut up block did not run")
        return out, feature


def cut_for_deepcache(
    module: nn.Module, arch: Architecture, branch: CacheBranch, *, shallow: bool
) -> tuple[nn.Module, Architecture]:
    """A UNet export wrapper cut at ``branch`` (the whole UNet, or the ``shallow`` one), and the
    architecture that declares its feature."""
    unet = exported_component(module)[1]
    shape = branch_shape(unet, branch)
    arch = dataclasses.replace(arch, deepcache_channels=shape.channels, deepcache_downscale=shape.downscale)
    return DeepCacheUNetExport(module, unet, branch, shape, shallow=shallow), arch


def restore_unread_inputs(model: onnx.ModelProto, spec: ModelSpec) -> None:
    """Declare again, in ``spec``'s order, the inputs the tracer left out of the shallow UNet because its
    branch never reads them (``pag_rows``, where every perturbed layer is skipped): the UNet's inputs are
    the shallow one's, whatever the branch, so every backend binds them alike."""
    graph = model.graph
    declared = {i.name: i for i in graph.input}
    for tensor in spec.inputs:
        if tensor.name not in declared:
            declared[tensor.name] = helper.make_tensor_value_info(
                tensor.name, helper.np_dtype_to_tensor_dtype(tensor.np_dtype), list(tensor.dims)
            )
    ordered = [declared[t.name] for t in spec.inputs if t.name in declared]
    ordered += [i for name, i in declared.items() if name not in {t.name for t in spec.inputs}]
    del graph.input[:]
    graph.input.extend(ordered)


def checkpoint_branch_shape(checkpoint: Path, branch: CacheBranch) -> BranchShape:
    """Check ``branch`` against a checkpoint's UNet, built from its config alone (no weights), before any
    export begins."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(checkpoint / "unet"))
    return branch_shape(unet, branch)


def write_deepcache_config(out_dir: Path, branch: CacheBranch | None, shape: BranchShape | None) -> None:
    """Record the export's DeepCache branch and its feature's shape (``deepcache/config.json``, which
    ``sdengine.model_dir`` reads), or remove the record of an earlier export into the same directory."""
    record = None
    if branch is not None and shape is not None:
        record = {"branch": branch.branch_id, "channels": shape.channels, "downscale": shape.downscale}
    write_record(out_dir, DEEPCACHE_CONFIG, record)
