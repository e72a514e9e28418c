"""Shared fixtures: tiny random models, known-answer models, and a clean offline Hub."""

from __future__ import annotations

import os
from pathlib import Path

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


# ---------------------------------------------------------------- converter checkpoints
# Official-layout state dicts of tiny encoders (test_converters.py, test_positions.py,
# test_converters_hf.py): a 4x4 grid of 8-pixel patches, width 32, 4 heads.

CONV_D, CONV_HEADS, CONV_PATCH, CONV_IMG = 32, 4, 8, 32
CONV_GRID = CONV_IMG // CONV_PATCH


def _r(*shape, scale=0.3):
    import torch

    return torch.randn(*shape) * scale


def _ln(name, dim=CONV_D):
    return {f"{name}.weight": 1 + _r(dim, scale=0.1), f"{name}.bias": _r(dim, scale=0.1)}


def vit_official(depth=2, *, pos=None, dim=CONV_D):
    sd = {
        "cls_token": _r(1, 1, dim),
        "pos_embed": _r(1, 1 + CONV_GRID * CONV_GRID, dim) if pos is None else pos,
        "patch_embed.proj.weight": _r(dim, 3, CONV_PATCH, CONV_PATCH, scale=0.1),
        "patch_embed.proj.bias": _r(dim),
        **_ln("norm", dim),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(_ln(p + "norm1", dim))
        sd.update(_ln(p + "norm2", dim))
        sd[p + "attn.qkv.weight"] = _r(3 * dim, dim)
        sd[p + "attn.qkv.bias"] = _r(3 * dim)
        sd[p + "attn.proj.weight"] = _r(dim, dim)
        sd[p + "attn.proj.bias"] = _r(dim)
        sd[p + "mlp.fc1.weight"] = _r(4 * dim, dim)
        sd[p + "mlp.fc1.bias"] = _r(4 * dim)
        sd[p + "mlp.fc2.weight"] = _r(dim, 4 * dim)
        sd[p + "mlp.fc2.bias"] = _r(dim)
    return sd


def beit_official(depth=2):
    import torch

    sd = {
        "cls_token": _r(1, 1, CONV_D),
        "mask_token": _r(1, 1, CONV_D),
        "patch_embed.proj.weight": _r(CONV_D, 3, CONV_PATCH, CONV_PATCH, scale=0.1),
        "patch_embed.proj.bias": _r(CONV_D),
        "rel_pos_bias.relative_position_bias_table": _r((2 * CONV_GRID - 1) ** 2 + 3, CONV_HEADS, scale=1.0),
        "rel_pos_bias.relative_position_index": torch.zeros(
            CONV_GRID * CONV_GRID + 1, CONV_GRID * CONV_GRID + 1, dtype=torch.long
        ),
        **_ln("norm"),
    }
    for i in range(depth):
        p = f"blocks.{i}."
        sd.update(_ln(p + "norm1"))
        sd.update(_ln(p + "norm2"))
        sd[p + "gamma_1"] = 0.1 + _r(CONV_D, scale=0.05)
        sd[p + "gamma_2"] = 0.1 + _r(CONV_D, scale=0.05)
        sd[p + "attn.qkv.weight"] = _r(3 * CONV_D, CONV_D)
        sd[p + "attn.q_bias"] = _r(CONV_D)
        sd[p + "attn.v_bias"] = _r(CONV_D)
        sd[p + "attn.proj.weight"] = _r(CONV_D, CONV_D)
        sd[p + "attn.proj.bias"] = _r(CONV_D)
        sd[p + "mlp.fc1.weight"] = _r(4 * CONV_D, CONV_D)
        sd[p + "mlp.fc1.bias"] = _r(4 * CONV_D)
        sd[p + "mlp.fc2.weight"] = _r(CONV_D, 4 * CONV_D)
        sd[p + "mlp.fc2.bias"] = _r(CONV_D)
    return sd


def our_forward(model, x):
    """Captured attention maps (in block order) and forward_features of `model`."""
    import torch

    from attnscope.capture import AttentionRecorder

    maps: dict[int, torch.Tensor] = {}
    with AttentionRecorder(model, lambda b: maps.__setitem__(b.index, b.attn.detach()), residual=False):
        with torch.no_grad():
            feats = model.forward_features(x)
    return [maps[i] for i in sorted(maps)], feats


def _save_with_yacs_config(path, model):
    """SimMIM pickles its yacs CfgNode; write one without yacs installed, then forget the class."""
    import sys
    import types

    import torch

    pkg, mod = types.ModuleType("yacs"), types.ModuleType("yacs.config")

    class CfgNode(dict):
        pass

    CfgNode.__module__, CfgNode.__qualname__ = "yacs.config", "CfgNode"
    mod.CfgNode, pkg.config = CfgNode, mod
    sys.modules.update({"yacs": pkg, "yacs.config": mod})
    try:
        config = CfgNode(MODEL=CfgNode(TYPE="vit", VIT=CfgNode(USE_SHARED_RPB=True)))
        torch.save({"model": model, "config": config, "epoch": 799, "max_accuracy": 0.0}, path)
    finally:
        del sys.modules["yacs"], sys.modules["yacs.config"]


# ---------------------------------------------------------------- probe


def mil_bags(n: int, seed: int, *, tokens: int = 16, dim: int = 32, classes: int = 4, registers: int = 2):
    """Bags whose label is carried by ONE token at a random position.

    Every token shows some class prototype: the distractors a random class, the key token
    the true class plus a marker direction. Averaging therefore sees mostly noise about
    the class, while a head that finds the marker reads the label off one token. Prefix
    tokens (a class token and registers) carry the marker with a *wrong* class, so a head
    that let them into the patch bag would be fooled.
    """
    import numpy as np

    g = np.random.default_rng(seed)
    fixed = np.random.default_rng(1234)
    protos = fixed.normal(size=(classes, dim)).astype(np.float32)
    marker = fixed.normal(size=dim).astype(np.float32)
    marker *= 4.0 / np.linalg.norm(marker)
    y = g.integers(0, classes, n)
    x = protos[g.integers(0, classes, (n, tokens))] + 0.3 * g.normal(size=(n, tokens, dim))
    key = g.integers(0, tokens, n)
    x[np.arange(n), key] = protos[y] + marker + 0.3 * g.normal(size=(n, dim))
    decoy = (y[:, None] + 1 + g.integers(0, classes - 1, (n, 1 + registers))) % classes
    prefix = protos[decoy] + marker + 0.3 * g.normal(size=(n, 1 + registers, dim))
    return np.concatenate([prefix, x], axis=1).astype(np.float32), y, key


# ---------------------------------------------------------------- run folders
# Interrupted and resumed runs (test_resume.py, e2e/test_resume_kill.py).

CSVS = ("layers.csv", "heads.csv", "images.csv")
PARTIAL = ".attnscope-partial"


def error_lines(text: str) -> list[str]:
    return [" ".join(line.split()) for line in " ".join(text.split("\n")).split("error: ")[1:]]


def make_images(root: Path, copies: int = 2) -> Path:
    """The bundled photos `copies` times over, under distinct names (7 x copies images)."""
    import shutil

    from attnscope.data import bundled_sample_paths

    images = root / "images"
    images.mkdir()
    for k in range(copies):
        for path in bundled_sample_paths():
            shutil.copy(path, images / f"{k}-{path.name}")
    return images


def assert_same_csvs(a: Path, b: Path) -> None:
    """The run CSVs of two folders: the same keys, values within 1e-12."""
    import numpy as np
    import pandas as pd

    for name in CSVS:
        x, y = pd.read_csv(a / name), pd.read_csv(b / name)
        values = [c for c in ("mean", "std", "value") if c in x.columns]
        keys = [c for c in x.columns if c not in values]
        pd.testing.assert_frame_equal(x[keys], y[keys])
        for col in values:
            np.testing.assert_allclose(y[col], x[col], rtol=0, atol=1e-12, err_msg=f"{name}:{col}")


def no_leftovers(run: Path) -> bool:
    return not (run / PARTIAL).exists() and not [p for p in run.rglob(".*") if p.is_file()]
