"""PHI-S teacher-feature normalisation (PHI-S, arXiv 2410.01680).

Teachers emit features with wildly different scales and very anisotropic spectra. PHI-S
maps a teacher's features ``y`` (``C`` channels) to

    Sigma = Cov(y) = U diag(lambda) U^T            (eigendecomposition)
    alpha = mean(lambda) ** -1/2
    y_hat = alpha * H U^T (y - mu)

with ``H`` a normalised Hadamard matrix (``H H^T = I``, every ``|H_ij| = 1/sqrt(C)``).
``U^T`` whitens the directions, ``H`` spreads the total variance evenly over all channels:
``Cov(y_hat) = alpha^2 H diag(lambda) H^T`` whose diagonal is ``alpha^2 * sum(lambda) / C = 1``.
So every output channel has unit variance, and the map is an isotropic scaling of a
rotation, hence exactly invertible: ``y = U H^T y_hat / alpha + mu``.
"""

from __future__ import annotations

import math
import os
import warnings
from functools import lru_cache
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["PHISNormalizer", "hadamard", "hadamard_or_orthogonal"]


# ----------------------------------------------------------------------------------------------
# Hadamard matrices
# ----------------------------------------------------------------------------------------------


def _is_prime(q: int) -> bool:
    if q < 2:
        return False
    return all(q % d for d in range(2, math.isqrt(q) + 1))


def _sylvester(n: int) -> torch.Tensor:
    """Unnormalised +-1 Sylvester matrix of order ``n`` (a power of two): H_2n = [[H, H], [H, -H]]."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Jacobsthal matrix Q_ij = chi(j - i) for a prime ``q``, chi the quadratic character mod q."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    chi[torch.arange(1, q) ** 2 % q] = 1.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(n: int) -> torch.Tensor | None:
    """Unnormalised Paley Hadamard matrix of order ``n`` (prime ``q`` only), or None.

    Type I (q = 3 mod 4, n = q + 1): H = I + [[0, 1^T], [-1, Q]] (Q is skew-symmetric).
    Type II (q = 1 mod 4, n = 2(q + 1)): C = [[0, 1^T], [1, Q]] (symmetric); replace each 0 of C
    by [[1, -1], [-1, -1]] and each +-1 by +-[[1, 1], [1, -1]].
    """
    q = n - 1
    if _is_prime(q) and q % 4 == 3:
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:] = 1.0
        s[1:, 0] = -1.0
        s[1:, 1:] = _jacobsthal(q)
        return torch.eye(n, dtype=torch.float64) + s
    if n % 2 == 0:
        q = n // 2 - 1
        if _is_prime(q) and q % 4 == 1:
            c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
            c[0, 1:] = 1.0
            c[1:, 0] = 1.0
            c[1:, 1:] = _jacobsthal(q)
            on_zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            on_sign = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            zero = (c == 0).to(torch.float64)
            return torch.kron(zero, on_zero) + torch.kron(c, on_sign)
    return None


@lru_cache(maxsize=16)
def _hadamard_unnormalised(n: int) -> torch.Tensor | None:
    if n < 1:
        return None
    # n = 2^a * m: try every power-of-two split, Sylvester(2^a) (x) Paley(m).
    two_power = 1
    while n % two_power == 0:
        m = n // two_power
        if m in (1, 2):
            return _sylvester(n)
        paley = _paley(m)
        if paley is not None:
            return torch.kron(_sylvester(two_power), paley)
        two_power *= 2
    return None


def hadamard(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalised Hadamard matrix of order ``n``: ``H H^T = I`` and every ``|H_ij| = 1/sqrt(n)``.

    Built as Sylvester (powers of two) or Sylvester (x) Paley (type I or II over a prime field),
    which covers every power of two and e.g. 12, 48, 768, 1152, 1280, 1536.
    Raises ValueError when no such construction is known for ``n``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"hadamard: n must be a positive int, got {n!r}")
    h = _hadamard_unnormalised(n)
    if h is None:
        raise ValueError(f"hadamard: no Sylvester/Paley construction for order n={n}")
    return (h / math.sqrt(n)).to(dtype)


def hadamard_or_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """``hadamard(n)`` where it exists, else a deterministic random orthogonal matrix (float64).

    The fallback keeps PHI-S invertible and decorrelating but only balances channel variances
    approximately (its entries are not all +-1/sqrt(n)).
    """
    try:
        return hadamard(n)
    except ValueError:
        warnings.warn(f"no Hadamard matrix of order {n}; PHI-S falls back to a random rotation", stacklevel=2)
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    # Sign-fix (Mezzadri) so Q is Haar-distributed and a deterministic function of the draw.
    signs = torch.sign(torch.diagonal(r))
    signs[signs == 0] = 1.0
    return q * signs[None, :]


# ----------------------------------------------------------------------------------------------
# PHI-S normaliser
# ----------------------------------------------------------------------------------------------


class PHISNormalizer(nn.Module):
    """Running PHI-S normaliser for one teacher's features (last dim = ``dim``).

    ``update(x)`` adds a batch to float64 running sums (``sum y``, ``sum y y^T``, count; all-reduced
    across ranks when torch.distributed is initialised, so every rank fits the same transform).
    The transform is refitted on update 1, every ``refresh_every`` updates and on update
    ``freeze_after``; later updates are ignored (statistics frozen). ``forward`` applies
    ``y_hat = alpha H U^T (y - mu)``, ``inverse`` undoes it. All state lives in buffers, so a
    trainer checkpoint restores it.

    Args:
        dim: number of feature channels ``C``.
        refresh_every: refit the transform every this many updates.
        freeze_after: stop accumulating (and refitting) after this many updates.
        eps: floor on ``mean(lambda)``, keeps ``alpha`` finite for constant features.
        seed: seed of the random-rotation fallback when no Hadamard matrix of order ``dim`` exists.
    """

    def __init__(self, dim: int, refresh_every: int = 100, freeze_after: int = 3000, eps: float = 1e-6, seed: int = 0):
        super().__init__()
        for name, value in (("dim", dim), ("refresh_every", refresh_every), ("freeze_after", freeze_after)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"PHISNormalizer: {name} must be a positive int, got {value!r}")
        if not eps > 0:
            raise ValueError(f"PHISNormalizer: eps must be > 0, got {eps!r}")
        self.dim, self.refresh_every, self.freeze_after, self.eps = dim, refresh_every, freeze_after, eps
        f64 = torch.float64
        self.register_buffer("sum", torch.zeros(dim, dtype=f64))
        self.register_buffer("sum_outer", torch.zeros(dim, dim, dtype=f64))
        self.register_buffer("count", torch.zeros((), dtype=f64))
        self.register_buffer("nonfinite_rows", torch.zeros((), dtype=f64))  # rows left out of the sums
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))
        self.register_buffer("num_fits", torch.zeros((), dtype=torch.long))
        self.register_buffer("mean", torch.zeros(dim, dtype=f64))
        self.register_buffer("alpha", torch.ones((), dtype=f64))
        # Cached maps, applied as x @ M: forward_matrix = (alpha H U^T)^T, inverse_matrix its inverse.
        self.register_buffer("forward_matrix", torch.eye(dim, dtype=f64))
        self.register_buffer("inverse_matrix", torch.eye(dim, dtype=f64))
        # Derived from dim alone, so not saved.
        self.register_buffer("rotation", hadamard_or_orthogonal(dim, seed), persistent=False)

    @property
    def fitted(self) -> bool:
        return bool(self.num_fits > 0)

    @property
    def frozen(self) -> bool:
        return int(self.num_updates) >= self.freeze_after

    def _check(self, x: torch.Tensor, what: str) -> None:
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"PHISNormalizer.{what}: x must be a floating-point tensor, got {type(x).__name__}")
        if x.ndim < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"PHISNormalizer.{what}: x must have shape (..., {self.dim}), got {tuple(x.shape)}")

    @torch.no_grad()
    def update(self, x: torch.Tensor, advance: bool = True) -> bool:
        """Accumulate statistics of ``x`` (..., dim); refit on schedule. Returns whether it refitted.

        ``advance=False`` only accumulates: the schedule (refresh every N updates, freeze after M)
        counts advancing updates, so a trainer with gradient accumulation advances once per optimizer
        step (on its first micro-batch) and every micro-batch of a step sees one transform.
        """
        self._check(x, "update")
        if self.frozen:
            return False
        flat = x.detach().reshape(-1, self.dim).to(self.sum.device, torch.float64)
        # A row with a NaN / Inf (a broken sample) is left out and counted: one bad image must not
        # poison the running statistics for the rest of the run. Masked, not indexed: no host sync.
        finite = torch.isfinite(flat).all(1, keepdim=True)
        flat = torch.where(finite, flat, 0.0)
        batch_sum, batch_outer = flat.sum(0), flat.T @ flat
        good = finite.sum().to(torch.float64)
        batch_counts = torch.stack([good, flat.shape[0] - good])
        if dist.is_available() and dist.is_initialized():
            for t in (batch_sum, batch_outer, batch_counts):
                dist.all_reduce(t)
        self.sum += batch_sum
        self.sum_outer += batch_outer
        self.count += batch_counts[0]
        self.nonfinite_rows += batch_counts[1]
        if not advance:
            return False
        self.num_updates += 1
        n = int(self.num_updates)
        # (``not fitted`` past update 1: every row so far was non-finite; fit at the first finite batch.)
        if n == 1 or n % self.refresh_every == 0 or n == self.freeze_after or not self.fitted:
            self.fit()
            return self.fitted
        return False

    @torch.no_grad()
    def fit(self) -> None:
        """Recompute mu, alpha and the cached matrices from the running sums."""
        if self.count <= 0:
            if self.nonfinite_rows > 0:
                # Not the caller's error: every row seen was non-finite. Stay unfitted until a finite
                # batch arrives (``update`` retries); the trainer's non-finite guard reports the step.
                return
            raise RuntimeError("PHISNormalizer.fit: no statistics yet; call update() first")
        mu = self.sum / self.count
        cov = self.sum_outer / self.count - torch.outer(mu, mu)
        cov = 0.5 * (cov + cov.T)  # eigh wants exact symmetry; rounding breaks it slightly.
        lam, u = torch.linalg.eigh(cov)
        h = self.rotation.to(u.device)
        if self.num_fits > 0:
            # eigh returns each eigenvector up to its sign: flip every new one towards the previous
            # basis (U_old = F_old H / alpha_old) so that a refresh moves the targets smoothly instead
            # of negating channels the student has already learnt.
            u_old = self.forward_matrix @ h / self.alpha
            sign = torch.sign((u_old * u).sum(0))
            u = u * torch.where(sign == 0, torch.ones_like(sign), sign)
        # Covariance is PSD; tiny negative eigenvalues are rounding noise.
        alpha = lam.clamp_min(0).mean().clamp_min(self.eps).rsqrt()
        self.mean.copy_(mu)
        self.alpha.copy_(alpha)
        self.forward_matrix.copy_((alpha * h @ u.T).T)
        self.inverse_matrix.copy_((u @ h.T / alpha).T)
        self.num_fits += 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before non-finite rows were counted.
        state_dict.setdefault(prefix + "nonfinite_rows", torch.zeros((), dtype=torch.float64))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _require_fit(self, what: str) -> None:
        if not self.fitted:
            raise RuntimeError(f"PHISNormalizer.{what}: not fitted; call update() first")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y_hat = alpha H U^T (x - mu)`` over the last dim, computed in ``x.dtype``."""
        self._check(x, "forward")
        self._require_fit("forward")
        mu = self.mean.to(x.dtype)
        return (x - mu) @ self.forward_matrix.to(x.dtype)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """``x = U H^T y / alpha + mu``: exact inverse of ``forward``."""
        self._check(y, "inverse")
        self._require_fit("inverse")
        return y @ self.inverse_matrix.to(y.dtype) + self.mean.to(y.dtype)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, refresh_every={self.refresh_every}, freeze_after={self.freeze_after}"


NORMALIZERS_FILE = "teacher_normalizers.safetensors"


def save_normalizers(directory: str | os.PathLike, normalizers: dict[str, PHISNormalizer]) -> Path:
    """Write the fitted transforms of several normalisers (one per teacher) next to an exported model.

    Only what ``forward`` / ``inverse`` need is kept (mean, alpha and the two matrices); the running
    statistics stay in the training checkpoint.
    """
    from safetensors.torch import save_file

    tensors = {}
    for name, phis in normalizers.items():
        if "/" in name:
            raise ValueError(f"teacher names must not contain '/', got {name!r}")
        for key in ("mean", "alpha", "forward_matrix", "inverse_matrix", "num_fits"):
            tensors[f"{name}/{key}"] = getattr(phis, key).detach().cpu().contiguous()
    path = Path(directory) / NORMALIZERS_FILE
    save_file(tensors, str(path))
    return path


def load_normalizers(directory: str | os.PathLike) -> dict[str, PHISNormalizer]:
    """The per-teacher normalisers written by ``save_normalizers`` (e.g. by ``radio export``).

    Map an adaptor's output back into the real teacher's feature space with
    ``load_normalizers(model_dir)[teacher].inverse(features)``.
    """
    from safetensors.torch import load_file

    path = Path(directory) / NORMALIZERS_FILE
    if not path.is_file():
        raise ValueError(f"{str(directory)!r} has no {NORMALIZERS_FILE} (written by `radio export`)")
    tensors = load_file(str(path))
    out: dict[str, PHISNormalizer] = {}
    for name in sorted({k.split("/", 1)[0] for k in tensors}):
        mean = tensors[f"{name}/mean"]
        phis = PHISNormalizer(mean.shape[0])
        for key in ("mean", "alpha", "forward_matrix", "inverse_matrix", "num_fits"):
            getattr(phis, key).copy_(tensors[f"{name}/{key}"])
        out[name] = phis
    return out
