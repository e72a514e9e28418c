"""One block's attention with the intermediates several metrics share (see docs/metrics.md).

`BlockContext` computes each shared quantity (the renormalised [cls] row, its sorted
cumulative sum, the patch row sums S_i, sum_j a_ij ln a_ij, the row entropies, the key
marginal, the residual norms) on first use and keeps it for the block, so a metric's
formula in `attnscope.metrics.registry` reads like the contract and still costs nothing
twice.

The patch->patch quantities touch all B*H*N*N probabilities and dominate the cost of a
run, so they are written to read the map a few times and never materialise the
renormalised rows p_i = a_i / S_i:

    H(p_i)            = ln S_i - (sum_j a_ij ln a_ij) / S_i
    sum_j p_i(j) D_ij = (sum_j a_ij D_ij) / S_i
    k(j)              = (1/N) sum_i a_ij / S_i          (one matrix-vector product)
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import TYPE_CHECKING

from attnscope.errors import AttnscopeError

if TYPE_CHECKING:
    import torch

    from attnscope.models import TokenLayout


class Workspace:
    """One scratch buffer for the map-sized temporaries of `block_metrics`, reused across
    blocks and batches.

    The patch->patch metrics need one temporary the size of the attention map (a ln a,
    then a D). It is taken from one buffer that only grows, because torch does not cache
    CPU memory: a fresh multi-MB tensor per block is mapped and faulted in page by page,
    which costs more than the arithmetic (measurements: benchmarks/README.md). Hold one
    Workspace per stream of batches (the statistics consumer in `measure` does); not for
    use from two threads at once.
    """

    def __init__(self) -> None:
        self._buffer: torch.Tensor | None = None

    def take(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """An uninitialised tensor of `shape`, `like`'s dtype and device, backed by the buffer."""
        import torch

        numel = math.prod(shape)
        buf = self._buffer
        if buf is None or buf.numel() < numel or buf.device != like.device or buf.dtype != like.dtype:
            buf = self._buffer = torch.empty(numel, dtype=like.dtype, device=like.device)
        return buf[:numel].view(shape)


_DISTANCE_CACHE: dict[tuple, torch.Tensor] = {}


def patch_distance_matrix(layout: TokenLayout, device: torch.device) -> torch.Tensor:
    """(N, N) float32 Euclidean distances between patch centres in input pixels, row-major
    grid, computed in float64 and rounded once."""
    import torch

    key = (layout.grid, layout.patch_size, str(device))
    cached = _DISTANCE_CACHE.get(key)
    if cached is None:
        gh, gw = layout.grid
        ph, pw = layout.patch_size
        rows = torch.arange(gh, dtype=torch.float64).repeat_interleave(gw) * ph
        cols = torch.arange(gw, dtype=torch.float64).repeat(gh) * pw
        coords = torch.stack([rows, cols], dim=1)
        cached = torch.cdist(coords, coords).to(device=device, dtype=torch.float32)
        _DISTANCE_CACHE[key] = cached
    return cached


def entropy(p: torch.Tensor) -> torch.Tensor:
    """Exact Shannon entropy over the last dim, 0 ln 0 = 0 (no epsilon in the log)."""
    import torch

    return torch.special.entr(p).sum(dim=-1)


def _sum_a_log_a(A: torch.Tensor, patches: slice, workspace: Workspace | None) -> torch.Tensor:
    """sum over patch keys of a ln a, per patch query row, with 0 ln 0 = 0 exactly.

    The elementwise work runs in place on the whole contiguous map and only then is the
    patch block summed: contiguous memory and no allocation are what make this pass cheap
    (log + mul, rather than `torch.special.entr`, for the same reason; see
    benchmarks/README.md). A zero probability gives 0 * log(0) = NaN, so when any row sum
    is NaN the pass is redone with log(0) raised to a finite value that a zero multiplies
    to 0 (no positive float32 is near it: the smallest subnormal has ln = -103.3).
    """
    import torch

    scratch = None if workspace is None else workspace.take(A.shape, A)
    terms = torch.log(A, out=scratch).mul_(A)
    sums = terms[:, :, patches, patches].sum(-1)
    if bool(torch.isnan(sums).any()):
        terms = torch.log(A, out=scratch).clamp_min_(-1e4).mul_(A)
        sums = terms[:, :, patches, patches].sum(-1)
    return sums


class BlockContext:
    """One block of B images: the attention A (B, H, T, T) as float32, the token layout,
    optionally the block input x and attention branch y (B, T, C), and the shared
    intermediates, each computed on first use.

    Tensors keep the leading (B, H) dims (B for the residual stream); `c` is token 0 when
    the layout has a class token. A zero row sum over the patches raises `AttnscopeError`
    (it cannot happen after a softmax).
    """

    def __init__(
        self,
        attn: torch.Tensor,
        layout: TokenLayout,
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
        workspace: Workspace | None = None,
        out: torch.Tensor | None = None,
    ) -> None:
        self.A = attn.float()
        self.out = out
        self.layout = layout
        self.x = x
        self.y = y
        self.workspace = workspace
        self.P = layout.patch_slice
        self.R = layout.register_slice
        self.n = layout.num_patches
        self.log_n = math.log(self.n)

    # ---------------------------------------------------------------- the [cls] row

    @cached_property
    def cls_patch(self) -> torch.Tensor:
        """A[c, j] for j in P: (B, H, N)."""
        return self.A[:, :, 0, self.P]

    @cached_property
    def cls_patch_sum(self) -> torch.Tensor:
        """S_c = sum_{j in P} A[c, j]: (B, H)."""
        total = self.cls_patch.sum(-1)
        if bool((total <= 0).any()):
            raise AttnscopeError(
                "[cls]->patch attention: an attention row puts zero mass on the patches "
                "(corrupt attention map)"
            )
        return total

    @cached_property
    def cls_probs(self) -> torch.Tensor:
        """p_c = A[c, P] / S_c: (B, H, N)."""
        return self.cls_patch / self.cls_patch_sum.unsqueeze(-1)

    @cached_property
    def cls_entropy(self) -> torch.Tensor:
        """H(p_c): (B, H)."""
        return entropy(self.cls_probs)

    @cached_property
    def cls_sorted(self) -> torch.Tensor:
        """p_c sorted descending: (B, H, N)."""
        return self.cls_probs.sort(dim=-1, descending=True)[0]

    @cached_property
    def cls_cumsum(self) -> torch.Tensor:
        """Cumulative sum of the descending p_c: (B, H, N)."""
        return self.cls_sorted.cumsum(dim=-1)

    # ---------------------------------------------------------------- patch queries over patch keys

    @cached_property
    def patch_patch(self) -> torch.Tensor:
        """A[i, j] for i, j in P (a strided view of the map): (B, H, N, N)."""
        return self.A[:, :, self.P, self.P]

    @cached_property
    def patch_sums(self) -> torch.Tensor:
        """S_i = sum_{j in P} A[i, j] for every patch query i: (B, H, N)."""
        import torch

        s = self.patch_patch.sum(-1)
        if not bool(torch.isfinite(s).all() and (s > 0).all()):
            raise AttnscopeError(
                "patch->patch attention: an attention row puts zero (or no finite) mass on the patches "
                "(corrupt attention map)"
            )
        return s

    @cached_property
    def inv_patch_sums(self) -> torch.Tensor:
        """1 / S_i: (B, H, N)."""
        return 1.0 / self.patch_sums

    @cached_property
    def patch_entropies(self) -> torch.Tensor:
        """H(p_i) = ln S_i - (sum_j a_ij ln a_ij) / S_i for every patch query i: (B, H, N)."""
        import torch

        a_log_a = _sum_a_log_a(self.A, self.P, self.workspace)  # (B, H, N), <= 0
        return torch.log(self.patch_sums) - a_log_a * self.inv_patch_sums

    @cached_property
    def mean_patch_entropy(self) -> torch.Tensor:
        """mean_{i in P} H(p_i): (B, H)."""
        return self.patch_entropies.mean(-1)

    @cached_property
    def key_marginal(self) -> torch.Tensor:
        """k(j) = mean_{i in P} p_i(j) (queries uniform; sums to 1): (B, H, N)."""
        import torch

        return torch.matmul(self.inv_patch_sums.unsqueeze(-2), self.patch_patch).squeeze(-2) / self.n

    # ---------------------------------------------------------------- residual stream

    @cached_property
    def residual_norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(x_t), norm(y_t)), L2 over channels: two (B, T)."""
        assert self.x is not None and self.y is not None
        return self.x.float().norm(dim=-1), self.y.float().norm(dim=-1)

    # ---------------------------------------------------------------- the tokens leaving the block

    @cached_property
    def wide(self) -> torch.dtype:
        """float64 where the device has it (not MPS): the token sums that cancel run in it."""
        import torch

        return torch.float32 if self.A.device.type == "mps" else torch.float64

    @cached_property
    def out_tokens(self) -> torch.Tensor:
        """The block output as float32: (B, T, C)."""
        assert self.out is not None
        return self.out.float()

    @cached_property
    def out_norms(self) -> torch.Tensor:
        """L2 norm of every output token over channels: (B, T)."""
        norms = self.out_tokens.norm(dim=-1)
        if bool((norms <= 0).any()):
            raise AttnscopeError("a block output token has zero norm: its cosine similarity is undefined")
        return norms

    @cached_property
    def patch_units(self) -> torch.Tensor:
        """Patch tokens scaled to unit norm: (B, N, C)."""
        return self.out_tokens[:, self.P] / self.out_norms[:, self.P].unsqueeze(-1)

    @cached_property
    def wide_patches(self) -> torch.Tensor:
        """The patch tokens of the block output in the wide dtype: (B, N, C)."""
        return self.out_tokens[:, self.P].to(self.wide)

    @cached_property
    def input_norms(self) -> torch.Tensor:
        """L2 norm of every token entering the block: (B, T), shared with the residual metrics."""
        assert self.x is not None
        return self.residual_norms[0] if self.y is not None else self.x.float().norm(dim=-1)

    @cached_property
    def patch_spectrum(self) -> torch.Tensor:
        """Singular values of each image's centred patch-token matrix, descending, in the wide
        dtype: (B, min(N, C)). From the eigenvalues of the smaller Gram matrix (exact in
        float64 to ~1e-8 of the largest singular value, far cheaper than an SVD)."""

        x = self.wide_patches
        x = x - x.mean(dim=1, keepdim=True)
        gram = x @ x.transpose(1, 2) if x.shape[1] <= x.shape[2] else x.transpose(1, 2) @ x
        # on the CPU for every device: GPU eigensolvers loop one small matrix at a time
        # (cuSOLVER batches only n <= 32) and MPS has none, while the Grams are small
        eig = eigvalsh_cpu(gram.cpu()).to(gram.device)
        return eig.clamp_min(0).flip(-1).sqrt()

    @cached_property
    def patch_log_amplitude(self) -> torch.Tensor:
        """mean over channels of ln(|F[u, v]| + 1e-6), F the 2-D DFT of each channel of the
        patch tokens laid out on the true gh x gw grid: (B, gh, gw), unshifted (DC at [0, 0])."""
        import torch

        gh, gw = self.layout.grid
        x = self.wide_patches
        grid = x.transpose(1, 2).reshape(x.shape[0], x.shape[2], gh, gw)
        return torch.log(torch.fft.fft2(grid).abs() + 1e-6).mean(dim=1)

    @cached_property
    def patch_frequency_profile(self) -> torch.Tensor:
        """L[u_t, v_t] - L[0, 0] along `frequency_lattice(grid)` (DC first), L the mean over
        channels of ln(|F| + 1e-6): (B, M + 1) in the wide dtype.

        Only these M + 1 coefficients are needed, so they are computed directly (one real
        and one imaginary basis row each, a matrix product per image) instead of the whole
        transform; step 0 is DC itself, so the profile starts at exactly 0.
        """
        import torch

        from attnscope.metrics.profiles import frequency_lattice

        gh, gw = self.layout.grid
        z = self.wide_patches  # (B, N, C), row-major over the grid
        rows = torch.arange(gh, dtype=self.wide, device=z.device).repeat_interleave(gw)
        cols = torch.arange(gw, dtype=self.wide, device=z.device).repeat(gh)
        lattice = torch.tensor(frequency_lattice((gh, gw)), dtype=self.wide, device=z.device)  # (M+1, 2)
        phase = 2 * math.pi * (lattice[:, :1] * rows / gh + lattice[:, 1:] * cols / gw)  # (M+1, N)
        basis = torch.cat([phase.cos(), phase.sin()])  # (2(M+1), N)
        re, im = (basis @ z).chunk(2, dim=1)  # two (B, M+1, C)
        log_amp = torch.log(torch.sqrt(re * re + im * im) + 1e-6).mean(-1)  # (B, M+1)
        return log_amp - log_amp[:, :1]


_EIGEN_POOLS: dict[int, ThreadPoolExecutor] = {}


def eigvalsh_cpu(gram: torch.Tensor) -> torch.Tensor:
    """`torch.linalg.eigvalsh` of a CPU batch (B, n, n), the matrices split over torch's
    intra-op thread count, each solved single-threaded; bit-identical to one call.

    LAPACK's own threading of one small (n ~ 200) eigenproblem is slower than one thread,
    and erratic (x10) when other processes share the cores, while the matrices of a batch
    are independent: one solver per core is 2x faster on 2 cores (benchmarks/README.md).
    MKL's thread count is process-wide, so it is set to 1 around the whole call.
    """
    import torch

    threads = torch.get_num_threads()
    workers = min(threads, gram.shape[0])
    torch.set_num_threads(1)
    try:
        if workers <= 1:
            return torch.linalg.eigvalsh(gram)
        pool = _EIGEN_POOLS.get(workers)
        if pool is None:
            pool = _EIGEN_POOLS[workers] = ThreadPoolExecutor(workers, thread_name_prefix="attnscope-eigh")
        return torch.cat(list(pool.map(torch.linalg.eigvalsh, gram.chunk(workers))))
    finally:
        torch.set_num_threads(threads)


def high_norm_mode(norms: torch.Tensor, ratio: float, gap: float) -> torch.Tensor:
    """norms (B, N) -> (B, N) bool: each row's separate mode of high values.

    A value belongs to it when it is more than `ratio` times the row's median (of an even
    count: the mean of the two middle values) and at or above `t`, the row's lowest value
    above the median with no value strictly between `t / gap` and `t` (an empty band of a
    factor `gap` below it). All False when no value qualifies.
    """
    import torch

    if norms.shape[-1] < 2:
        return torch.zeros_like(norms, dtype=torch.bool)
    med = torch.quantile(norms, 0.5, dim=-1, keepdim=True)
    ranked = norms.sort(dim=-1).values
    upper, lower = ranked[..., 1:], ranked[..., :-1]
    starts = (upper > med) & (upper >= gap * lower)  # an empty band of a factor `gap` below `upper`
    t = torch.where(starts, upper, torch.inf).amin(dim=-1, keepdim=True)  # the lowest one
    return (norms >= t) & (norms > ratio * med)
