"""Independent float64 forwards of the papers' encoders, written from the equations and the
official repositories' key names (not from timm or attnscope), for the converter tests.

Each takes the official state dict (keys as the release file names them, prefixes
stripped) and an image batch, and returns every block's post-softmax attention (B, H, T, T)
and the final normed tokens (B, T, D).
"""

from __future__ import annotations

import math

import torch

Tensor = torch.Tensor


def _d(sd: dict[str, Tensor], key: str) -> Tensor:
    return sd[key].double()


def _ln(x: Tensor, sd: dict[str, Tensor], name: str, eps: float) -> Tensor:
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * _d(sd, f"{name}.weight") + _d(sd, f"{name}.bias")


def _gelu(x: Tensor) -> Tensor:
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def _softmax(z: Tensor) -> Tensor:
    z = z - z.max(-1, keepdim=True).values
    e = z.exp()
    return e / e.sum(-1, keepdim=True)


def _patches(sd: dict[str, Tensor], x: Tensor, weight: str, bias: str) -> Tensor:
    w = _d(sd, weight)
    p = w.shape[-1]
    b, c, h, wd = x.shape
    cols = (
        x.reshape(b, c, h // p, p, wd // p, p).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // p) * (wd // p), -1)
    )
    return cols @ w.reshape(w.shape[0], -1).T + _d(sd, bias)


def _heads(t: Tensor, n: int) -> Tensor:
    b, s, d = t.shape
    return t.reshape(b, s, n, d // n).transpose(1, 2)


def vit_forward(sd: dict[str, Tensor], x: Tensor, heads: int, eps: float = 1e-6):
    """ViT as in MAE / DINO / iBOT / MoCo v3 / LUT: [cls] + patches + absolute positions,
    pre-norm blocks with a fused qkv projection (bias), GELU MLP, optional LayerScale."""
    x = x.double()
    t = _patches(sd, x, "patch_embed.proj.weight", "patch_embed.proj.bias")
    t = torch.cat([_d(sd, "cls_token").expand(t.shape[0], -1, -1), t], dim=1) + _d(sd, "pos_embed")
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    maps = []
    for i in range(depth):
        p = f"blocks.{i}."
        h = _ln(t, sd, p + "norm1", eps)
        qkv = h @ _d(sd, p + "attn.qkv.weight").T + _d(sd, p + "attn.qkv.bias")
        q, k, v = (_heads(part, heads) for part in qkv.chunk(3, dim=-1))
        a = _softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]))
        maps.append(a)
        o = (a @ v).transpose(1, 2).reshape(t.shape) @ _d(sd, p + "attn.proj.weight").T + _d(
            sd, p + "attn.proj.bias"
        )
        t = t + o
        h = _ln(t, sd, p + "norm2", eps)
        m = _gelu(h @ _d(sd, p + "mlp.fc1.weight").T + _d(sd, p + "mlp.fc1.bias"))
        t = t + m @ _d(sd, p + "mlp.fc2.weight").T + _d(sd, p + "mlp.fc2.bias")
    return maps, _ln(t, sd, "norm", eps)


def beit_relative_index(gh: int, gw: int) -> Tensor:
    """BEiT's (1+N, 1+N) index into the relative table: patch pairs by their offset, then three
    extra entries for [cls]->patch, patch->[cls] and [cls]->[cls]."""
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    r, c = rows.flatten(), cols.flatten()
    dr = r[:, None] - r[None, :] + gh - 1
    dc = c[:, None] - c[None, :] + gw - 1
    n_pairs = (2 * gh - 1) * (2 * gw - 1)
    index = torch.empty(gh * gw + 1, gh * gw + 1, dtype=torch.long)
    index[1:, 1:] = dr * (2 * gw - 1) + dc
    index[0, :] = n_pairs
    index[:, 0] = n_pairs + 1
    index[0, 0] = n_pairs + 2
    return index


def beit_forward(sd: dict[str, Tensor], x: Tensor, heads: int, eps: float = 1e-6):
    """BEiT / BEiT-v2 / SimMIM encoder with one shared relative-position table
    (`rel_pos_bias.relative_position_bias_table`), q/v biases, LayerScale gammas, no absolute
    position term."""
    x = x.double()
    p_size = sd["patch_embed.proj.weight"].shape[-1]
    gh, gw = x.shape[2] // p_size, x.shape[3] // p_size
    t = _patches(sd, x, "patch_embed.proj.weight", "patch_embed.proj.bias")
    t = torch.cat([_d(sd, "cls_token").expand(t.shape[0], -1, -1), t], dim=1)
    if "pos_embed" in sd:
        t = t + _d(sd, "pos_embed")
    table = _d(sd, "rel_pos_bias.relative_position_bias_table")
    bias = table[beit_relative_index(gh, gw)].permute(2, 0, 1)  # (H, T, T)
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    maps = []
    for i in range(depth):
        p = f"blocks.{i}."
        h = _ln(t, sd, p + "norm1", eps)
        qb, vb = _d(sd, p + "attn.q_bias"), _d(sd, p + "attn.v_bias")
        qkv = h @ _d(sd, p + "attn.qkv.weight").T + torch.cat([qb, torch.zeros_like(qb), vb])
        q, k, v = (_heads(part, heads) for part in qkv.chunk(3, dim=-1))
        a = _softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + bias)
        maps.append(a)
        o = (a @ v).transpose(1, 2).reshape(t.shape) @ _d(sd, p + "attn.proj.weight").T + _d(
            sd, p + "attn.proj.bias"
        )
        t = t + _d(sd, p + "gamma_1") * o
        h = _ln(t, sd, p + "norm2", eps)
        m = _gelu(h @ _d(sd, p + "mlp.fc1.weight").T + _d(sd, p + "mlp.fc1.bias"))
        t = t + _d(sd, p + "gamma_2") * (m @ _d(sd, p + "mlp.fc2.weight").T + _d(sd, p + "mlp.fc2.bias"))
    return maps, _ln(t, sd, "norm", eps)


def _rms(x: Tensor, weight: Tensor | None, eps: float = 1e-5) -> Tensor:
    y = x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)
    return y if weight is None else y * weight.double()


def capi_positions(gh: int, gw: int, n_reg: int) -> Tensor:
    """Patch (row, col) on a [0, 1] lattice; registers evenly on the square's border, going
    round from (0, 0): down the first axis, along the second, back, and home."""
    pos = [
        (i / (gh - 1) if gh > 1 else 0.0, j / (gw - 1) if gw > 1 else 0.0)
        for i in range(gh)
        for j in range(gw)
    ]
    side = n_reg // 4
    regs = []
    for s in range(4):
        for m in range(side):
            f = m / side
            regs.append([(f, 0.0), (1.0, f), (1.0 - f, 1.0), (0.0, 1.0 - f)][s])
    return torch.tensor(regs + pos, dtype=torch.float64)


def capi_forward(sd: dict[str, Tensor], x: Tensor, heads: int):
    """CAPI's encoder from its equations: registers + patches, pre-RMSNorm blocks, separate
    bias-free q/k/v, rotary angles theta = pos @ freqs applied as x cos + rot(x) sin with
    rot(a, b) = (-b, a) on channel halves, bias-free GELU MLP, weightless final RMSNorm.
    `sd` is the release file's `backbone.` part with the prefix removed."""
    x = x.double()
    p_size = sd["patch_embed.weight"].shape[-1]
    gh, gw = x.shape[2] // p_size, x.shape[3] // p_size
    t = _patches(sd, x, "patch_embed.weight", "patch_embed.bias")
    regs = _d(sd, "registers")
    t = torch.cat([regs.expand(t.shape[0], -1, -1), t], dim=1)
    pos = capi_positions(gh, gw, regs.shape[1])
    depth = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("encoder.blocks."))
    maps = []
    for i in range(depth):
        p = f"encoder.blocks.{i}."
        h = _rms(t, sd[p + "residual1.norm.weight"])
        q, k, v = (_heads(h @ _d(sd, p + f"residual1.fn.{n}_proj.weight").T, heads) for n in "qkv")
        theta = pos @ _d(sd, p + "residual1.fn.rope.freqs")  # (T, head_dim)

        def turn(z: Tensor, theta: Tensor = theta) -> Tensor:
            half = z.shape[-1] // 2
            rotated = torch.cat([-z[..., half:], z[..., :half]], dim=-1)
            return z * theta.cos() + rotated * theta.sin()

        q, k = turn(q), turn(k)
        a = _softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]))
        maps.append(a)
        t = t + (a @ v).transpose(1, 2).reshape(t.shape) @ _d(sd, p + "residual1.fn.proj.weight").T
        h = _rms(t, sd[p + "residual2.norm.weight"])
        t = t + _gelu(h @ _d(sd, p + "residual2.fn.fc1.weight").T) @ _d(sd, p + "residual2.fn.fc2.weight").T
    return maps, _rms(t, None)
