"""Shared fixtures: tiny random models, known-answer models, and a clean offline Hub."""

from __future__ import annotations

import os

import pytest

# Tests never touch the network: a cache miss must fail fast, not retry for a minute.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

TINY = {
    # name -> (timm name, kwargs): cover plain ViT, no-cls + register, DINOv2-style
    # (cls + registers + LayerScale), Eva/DINOv3 (rotary + registers), BEiT (rel-pos bias).
    "vit": ("test_vit", {}),
    "noclsreg": ("test_vit2", {}),
    "dinov2reg": ("vit_small_patch14_reg4_dinov2", {"depth": 2, "img_size": 70}),
    "dinov3": ("vit_small_patch16_dinov3", {"depth": 2, "img_size": 64}),
    "beit": ("beitv2_base_patch16_224", {"depth": 2, "img_size": 64, "embed_dim": 64, "num_heads": 2}),
    "eva02": ("eva02_base_patch14_224", {"depth": 2, "img_size": 56, "embed_dim": 64, "num_heads": 2}),
}


@pytest.fixture
def one_thread():
    """Torch on one thread for the test, restored after it: tiny tensors gain nothing from
    threads, a busy shared CPU makes them thrash, and torchrun's ranks (OMP_NUM_THREADS=1)
    then do the same arithmetic as an in-process reference."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_tiny(kind: str, seed: int = 0, sharpen: float = 1.0):
    """A small random model in eval mode; `sharpen` scales q/k weights so attention is
    peaked like a trained model's instead of near-uniform."""
    import timm
    import torch

    name, kwargs = TINY[kind]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    if sharpen != 1.0:
        sharpen_qk(model, sharpen)
    return model


def sharpen_qk(model, factor: float) -> None:
    import torch

    with torch.no_grad():
        for block in model.blocks:
            attn = block.attn
            if getattr(attn, "qkv", None) is not None:
                dim = attn.qkv.weight.shape[0] // 3
                attn.qkv.weight[: 2 * dim] *= factor
            else:
                attn.q_proj.weight *= factor
                attn.k_proj.weight *= factor


@pytest.fixture
def tiny():
    return make_tiny


@pytest.fixture
def sample_paths():
    from attnscope.data import bundled_sample_paths

    return bundled_sample_paths()
