"""Capture post-softmax attention (and the residual stream) block by block.

timm's attention modules (ViT `Attention`, `EvaAttention`, BEiT `Attention`) compute
`softmax(...)` and pass the result through `self.attn_drop` when fused attention is off;
every pre-softmax term the model applies (qk-norm, relative position bias, rotary
embedding, masks) is already in it. A forward hook on `attn_drop` therefore sees the exact
A[b, h, T, T] the model uses, without re-deriving it from q and k.

Each block's tensors are handed to a consumer in the block's own forward hook and then
dropped, so at most one block's maps are alive at any time.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from attnscope.errors import AttnscopeError

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class BlockTensors:
    """What one block hands to the consumer for one batch."""

    index: int
    attn: torch.Tensor  # (B, H, T, T) post-softmax, in the forward's dtype
    x: torch.Tensor | None  # (B, T, C) residual stream entering the block
    y: torch.Tensor | None  # (B, T, C) attention branch as added to the stream
    # (B, T, C) the block's output, the residual stream leaving it (for the last block: before
    # the model's final norm); None unless the recorder was asked for tokens
    out: torch.Tensor | None = None


BlockConsumer = Callable[[BlockTensors], None]


def find_attention_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, block) of every transformer block with a hookable attention."""
    blocks = getattr(model, "blocks", None)
    found: list[tuple[str, nn.Module]] = []
    if blocks is not None:
        for i, block in enumerate(blocks):
            attn = getattr(block, "attn", None)
            if attn is None or not hasattr(attn, "attn_drop"):
                raise AttnscopeError(
                    f"blocks.{i} ({type(block).__name__}) has no attention module with `attn_drop`; "
                    "attnscope cannot see its softmax"
                )
            found.append((f"blocks.{i}", block))
    if not found:
        raise AttnscopeError(f"{type(model).__name__} has no attention blocks attnscope can hook")
    return found


class AttentionRecorder:
    """Context manager that streams each block's attention maps to `consumer`.

    On entry it switches fused attention off (the fused kernel never materialises A) and
    registers its hooks; on exit it removes every handle and restores the fused flags, so
    the model computes exactly what it computed before. After each forward, `check()`
    raises if a block produced no map (a module that bypasses `attn_drop`).
    """

    def __init__(
        self, model: nn.Module, consumer: BlockConsumer, *, residual: bool = True, tokens: bool = False
    ) -> None:
        self.model = model
        self.consumer = consumer
        self.residual = residual
        self.tokens = tokens
        self.blocks = find_attention_blocks(model)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._fused: list[tuple[Any, bool]] = []
        self._pending: dict[int, dict[str, torch.Tensor]] = {}
        self._seen: set[int] = set()

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def __enter__(self) -> AttentionRecorder:
        for index, (_, block) in enumerate(self.blocks):
            attn: Any = block.attn  # timm's Attention / EvaAttention / BEiT Attention
            if hasattr(attn, "fused_attn"):
                self._fused.append((attn, bool(attn.fused_attn)))
                attn.fused_attn = False
            self._handles.append(attn.attn_drop.register_forward_hook(self._attn_hook(index)))
            drop_path = getattr(block, "drop_path1", None)
            if self.tokens or (self.residual and drop_path is not None):
                self._handles.append(
                    block.register_forward_pre_hook(self._input_hook(index), with_kwargs=True)
                )
            if self.residual and drop_path is not None:
                self._handles.append(drop_path.register_forward_hook(self._branch_hook(index)))
            self._handles.append(block.register_forward_hook(self._done_hook(index)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for attn, flag in self._fused:
            attn.fused_attn = flag
        self._fused.clear()
        self._pending.clear()

    def reset(self) -> None:
        """Forget which blocks have reported; call before each forward."""
        self._seen.clear()
        self._pending.clear()

    def check(self) -> None:
        """Raise naming every block that produced no attention map in the last forward."""
        missing = [name for i, (name, _) in enumerate(self.blocks) if i not in self._seen]
        if missing:
            raise AttnscopeError(
                f"no attention map was captured from {', '.join(missing)}: the attention module "
                "bypassed its softmax/attn_drop path (custom fused kernel?)"
            )

    # Hook factories: each closure knows its block index.
    def _input_hook(self, index: int):
        def hook(module, args, kwargs):
            x = args[0] if args else kwargs.get("x")
            self._pending.setdefault(index, {})["x"] = x

        return hook

    def _attn_hook(self, index: int):
        def hook(module, inputs, output):
            slot = self._pending.setdefault(index, {})
            if "attn" in slot:
                raise AttnscopeError(f"blocks.{index} computed attention twice in one forward")
            slot["attn"] = inputs[0]  # the softmax output itself, before any dropout

        return hook

    def _branch_hook(self, index: int):
        def hook(module, inputs, output):
            self._pending.setdefault(index, {})["y"] = inputs[0]

        return hook

    def _done_hook(self, index: int):
        def hook(module, inputs, output):
            slot = self._pending.pop(index, {})
            attn = slot.get("attn")
            if attn is None:
                raise AttnscopeError(
                    f"{self.blocks[index][0]} produced no attention map (its attention bypassed attn_drop)"
                )
            self._seen.add(index)
            out = output if self.tokens and not isinstance(output, tuple) else None
            self.consumer(BlockTensors(index, attn, slot.get("x"), slot.get("y"), out))

        return hook
