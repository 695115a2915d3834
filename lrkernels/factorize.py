"""Turn a dense weight ``W`` (out, in) into low-rank factors ``U`` (out, r) and ``V`` (r, in).

Two methods, one rank-selection rule:

- `truncated_svd` — plain truncated SVD, ``W ≈ U · V`` optimal in the Frobenius norm
  (Eckart–Young): ``‖W − U·V‖_F = sqrt(Σ_{i>r} σ_i²)`` with σ the singular values of W.
- `activation_aware_svd` — "truncation-aware data whitening" (the approach of SVD-LLM):
  given calibration inputs ``X`` (n, in) or their Gram matrix ``G = Xᵀ·X``, minimise the error
  of the layer's *outputs*, ``‖(W − U·V)·Xᵀ‖_F``, instead of the error of the weight.

Both return balanced factors: with ``A = P·Σ·Qᵀ`` the SVD that is truncated,
``U = P_r·√Σ_r`` and ``V = √Σ_r·Q_rᵀ(·S⁻¹)``, so that ``U`` and ``V`` have matching scales
(column k of U and row k of V both have norm √σ_k in the plain case), which keeps the
factors within float16/bfloat16 range when W is. All linear algebra runs in float64 and
the factors are returned in the weight's dtype, on the weight's device.

Rank selection (`select_rank`): exactly one of

- ``rank``: an int with ``1 ≤ rank ≤ min(out, in)``;
- ``energy``: ``0 < energy ≤ 1``, the smallest r whose kept energy ``Σ_{i≤r} σ_i²`` reaches
  ``energy · Σ_i σ_i²`` (σ of the matrix that is truncated: W, or W·S when whitened);
- ``ratio``: ``0 < ratio``, the largest r with ``r·(in + out) ≤ ratio·in·out`` — the factors
  hold at most ``ratio`` times the dense weight's parameters — clamped to ``[1, min(out, in)]``.
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "Factorization",
    "GramAccumulator",
    "Whitening",
    "activation_aware_svd",
    "factorize_weight",
    "relative_output_error",
    "select_rank",
    "truncated_svd",
    "whitening_factor",
]

#: Default relative damping of the Gram matrix before its Cholesky factorisation.
DEFAULT_DAMPING = 1e-6
# Relative slack on the energy threshold so that a spectrum sitting exactly on the threshold
# (up to float64 rounding of the SVD) selects the same rank as the exact arithmetic would.
_ENERGY_RTOL = 1e-12
# Cholesky attempts with a damping multiplied by 10 each time, before the eigen fallback.
_MAX_CHOLESKY_ATTEMPTS = 6
# Smallest relative damping used once an attempt has failed (matters when damping=0).
_MIN_RETRY_DAMPING = 1e-12


# --------------------------------------------------------------------------------------------
# Rank selection
# --------------------------------------------------------------------------------------------


def _validate_rank_args(rank, energy, ratio) -> None:
    """Checks that exactly one of rank/energy/ratio is given and that it is in range (the
    shape-dependent upper bound of ``rank`` is checked by `select_rank`)."""
    given = [n for n, v in (("rank", rank), ("energy", energy), ("ratio", ratio)) if v is not None]
    if len(given) != 1:
        got = ", ".join(given) if given else "none"
        raise ValueError(f"exactly one of rank, energy, ratio must be given (got {got})")
    if rank is not None:
        if isinstance(rank, bool):
            raise ValueError(f"rank must be an integer, got {rank!r}")
        try:
            r = operator.index(rank)
        except TypeError:
            raise ValueError(f"rank must be an integer, got {rank!r}") from None
        if r < 1:
            raise ValueError(f"rank must be >= 1, got {r}")
    if energy is not None:
        if isinstance(energy, bool) or not isinstance(energy, numbers.Real):
            raise ValueError(f"energy must be a real number in (0, 1], got {energy!r}")
        if not (0.0 < float(energy) <= 1.0):  # also rejects NaN
            raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, numbers.Real):
            raise ValueError(f"ratio must be a positive real number, got {ratio!r}")
        if not (0.0 < float(ratio) < math.inf):  # also rejects NaN
            raise ValueError(f"ratio must be a finite number > 0, got {ratio!r}")


def _rank_from_ratio(out_features: int, in_features: int, ratio: float) -> int:
    budget = float(ratio) * in_features * out_features
    per_rank = in_features + out_features
    r = int(math.floor(budget / per_rank))
    # Guard the floor against rounding of the division in both directions.
    while (r + 1) * per_rank <= budget:
        r += 1
    while r > 0 and r * per_rank > budget:
        r -= 1
    return max(1, min(r, min(out_features, in_features)))


def _rank_from_energy(singular_values: Tensor, energy: float) -> int:
    s2 = singular_values.detach().to(torch.float64).flatten() ** 2
    if s2.numel() == 0:
        raise ValueError("energy: singular_values is empty")
    kept = torch.cumsum(s2, 0)
    total = kept[-1]
    if not torch.isfinite(total):
        raise ValueError("energy: singular values are not finite")
    if total <= 0:
        return 1  # zero matrix: any rank keeps all (no) energy
    threshold = float(energy) * total * (1.0 - _ENERGY_RTOL)
    r = int((kept < threshold).sum().item()) + 1
    return min(r, s2.numel())


def select_rank(
    out_features: int,
    in_features: int,
    *,
    rank: int | None = None,
    energy: float | None = None,
    ratio: float | None = None,
    singular_values: Tensor | None = None,
) -> int:
    """The rank for a (out_features, in_features) weight; exactly one of ``rank``, ``energy``,
    ``ratio`` (see the module docstring for the rules).

    Args:
        rank: ``1 ≤ rank ≤ min(out_features, in_features)``; returned as is.
        energy: ``0 < energy ≤ 1``; smallest r with ``Σ_{i≤r} σ_i² ≥ energy · Σ_i σ_i²``
            (up to a relative slack of 1e-12 for rounding). Needs ``singular_values``
            (descending, any float dtype). A spectrum with trailing zeros and ``energy=1``
            gives the numerical rank; an all-zero spectrum gives 1.
        ratio: ``ratio > 0``; largest r with ``r·(in + out) ≤ ratio·in·out``, at least 1 and at
            most ``min(out_features, in_features)``.

    Raises:
        ValueError naming the argument: none or several given, out of range, wrong type.
    """
    _validate_rank_args(rank, energy, ratio)
    max_rank = min(out_features, in_features)
    if max_rank < 1:
        raise ValueError(f"cannot factorise a weight of shape ({out_features}, {in_features})")
    if rank is not None:
        r = operator.index(rank)
        if r > max_rank:
            raise ValueError(
                f"rank must be <= min(out_features, in_features) = {max_rank}, got {r}"
            )
        return r
    if ratio is not None:
        return _rank_from_ratio(out_features, in_features, ratio)
    if singular_values is None:
        raise ValueError("energy needs singular_values")
    return min(_rank_from_energy(singular_values, energy), max_rank)


# --------------------------------------------------------------------------------------------
# Gram matrices and whitening
# --------------------------------------------------------------------------------------------


class GramAccumulator:
    """Accumulates ``G = Σ_batches xᵀ·x`` (in, in) in float64, without storing activations.

    Each ``update(x)`` takes ``x`` of shape ``(..., in_features)`` (any leading shape, any
    float dtype), flattens it to ``(rows, in_features)`` and adds ``xᵀ·x``; ``count`` is the
    number of rows seen so far. The sum is not normalised: the factorisation is invariant to
    scaling G (the damping is relative to ``mean(diag(G))``).

    Args:
        in_features: the last dimension of the inputs.
        device: where to keep G; None = the device of the first batch (later batches are
            moved there).
    """

    def __init__(self, in_features: int, *, device: torch.device | str | None = None) -> None:
        in_features = operator.index(in_features)
        if in_features < 1:
            raise ValueError(f"in_features must be >= 1, got {in_features}")
        self.in_features = in_features
        self.device = None if device is None else torch.device(device)
        self.count = 0
        self._gram: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Adds ``x.reshape(-1, in)ᵀ · x.reshape(-1, in)`` (computed in float64)."""
        if not isinstance(x, Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        if self._gram is None:
            device = self.device if self.device is not None else x.device
            self._gram = torch.zeros(
                self.in_features, self.in_features, dtype=torch.float64, device=device
            )
        rows = x.detach().reshape(-1, self.in_features)
        rows = rows.to(device=self._gram.device, dtype=torch.float64)
        if rows.shape[0]:
            self._gram.addmm_(rows.T, rows)
        self.count += rows.shape[0]

    @property
    def gram(self) -> Tensor:
        """The accumulated ``(in, in)`` float64 sum ``Σ xᵀ·x`` (zeros before any update). This
        is the accumulator's own storage: clone it before modifying it."""
        if self._gram is None:
            device = self.device if self.device is not None else "cpu"
            return torch.zeros(
                self.in_features, self.in_features, dtype=torch.float64, device=device
            )
        return self._gram

    def reset(self) -> None:
        self.count = 0
        self._gram = None

    def __repr__(self) -> str:
        return f"GramAccumulator(in_features={self.in_features}, count={self.count})"


class Whitening(NamedTuple):
    """A square root ``S`` (in, in) float64 of a damped Gram matrix: ``S·Sᵀ = G + damping·I``
    (Cholesky route, ``lower_triangular=True``) or ``S·Sᵀ = E·diag(max(e, floor))·Eᵀ``
    (eigen fallback, ``lower_triangular=False``). ``damping`` is the absolute λ added."""

    factor: Tensor
    lower_triangular: bool
    damping: float


def _as_gram(gram: Tensor, in_features: int | None, device: torch.device | None) -> Tensor:
    if not isinstance(gram, Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    n = gram.shape[-1] if gram.dim() == 2 else None
    if gram.dim() != 2 or gram.shape[0] != n or (in_features is not None and n != in_features):
        want = "(in, in)" if in_features is None else f"({in_features}, {in_features})"
        raise ValueError(f"gram must have shape {want}, got {tuple(gram.shape)}")
    if gram.is_complex():
        raise ValueError("gram must be real")
    g = gram.detach().to(device=device if device is not None else gram.device, dtype=torch.float64)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("gram contains non-finite values (NaN or inf)")
    return 0.5 * (g + g.T)  # symmetrise: accumulated sums are symmetric only up to rounding


def whitening_factor(gram: Tensor, damping: float = DEFAULT_DAMPING) -> Whitening:
    """A robust square root S of the Gram matrix G (in, in): ``G + λ·I ≈ S·Sᵀ``.

    Safeguards, in order:

    1. float64 throughout; G is symmetrised, ``(G + Gᵀ)/2``; non-finite G → ValueError.
    2. ``λ = damping · mean(diag(G))`` is added to the diagonal (relative damping, so the
       result does not depend on the scale of G). It regularises directions the calibration
       data never visits (zero columns, inputs lying in a subspace) and bounds ``‖S⁻¹‖``.
    3. Lower Cholesky factor of ``G + λ·I``; on failure λ is multiplied by 10 (at least
       ``1e-12 · mean(diag(G))`` when ``damping=0``), up to 6 attempts.
    4. If all attempts fail (G far from positive semi-definite), eigen-decomposition
       ``G = E·diag(e)·Eᵀ`` with eigenvalues clamped from below to
       ``floor = max(damping, 1e-12) · mean(diag(G))``: ``S = E·diag(√max(e, floor))``.

    Args:
        gram: ``(in, in)``, any real dtype and device (the result is float64 on that device).
        damping: ``≥ 0``, relative to ``mean(diag(G))``.

    Raises:
        ValueError: bad shape, non-finite values, negative damping, or ``mean(diag(G)) ≤ 0``
            (an all-zero G has no whitening; `factorize_weight` falls back to plain SVD).
    """
    damping = _check_damping(damping)
    g = _as_gram(gram, None, None)
    n = g.shape[0]
    scale = float(torch.diagonal(g).mean())
    if not scale > 0.0:
        if scale == 0.0 and not bool(g.any()):
            raise ValueError("gram is all zeros: no calibration signal to whiten with")
        raise ValueError(
            f"gram must be positive semi-definite (mean of its diagonal is {scale:.3g})"
        )
    eye = torch.eye(n, dtype=torch.float64, device=g.device)
    lam = damping * scale
    for _ in range(_MAX_CHOLESKY_ATTEMPTS):
        L, info = torch.linalg.cholesky_ex(g + lam * eye if lam > 0.0 else g)
        if int(info) == 0 and bool(torch.isfinite(L).all()):
            return Whitening(L, True, lam)
        lam = max(10.0 * lam, _MIN_RETRY_DAMPING * scale)
    e, E = torch.linalg.eigh(g)
    floor = max(damping, _MIN_RETRY_DAMPING) * scale
    e = e.clamp_min(floor)
    return Whitening(E * e.sqrt(), False, floor)


def _check_damping(damping) -> float:
    if isinstance(damping, bool) or not isinstance(damping, numbers.Real):
        raise ValueError(f"damping must be a real number >= 0, got {damping!r}")
    if not (0.0 <= float(damping) < math.inf):
        raise ValueError(f"damping must be a finite number >= 0, got {damping!r}")
    return float(damping)


# --------------------------------------------------------------------------------------------
# Factorisation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Factorization:
    """Result of `factorize_weight`.

    Attributes:
        U: ``(out, rank)`` in the weight's dtype and device.
        V: ``(rank, in)`` in the weight's dtype and device.
        singular_values: float64 ``(min(out, in),)``, descending — the full spectrum of the
            truncated matrix: W (plain) or W·S (activation-aware, S the whitening factor).
        whitened: whether the activation-aware route was used.
        damping: the absolute λ added to the Gram diagonal (None when not whitened).
    """

    U: Tensor
    V: Tensor
    singular_values: Tensor
    whitened: bool
    damping: float | None = None

    @property
    def rank(self) -> int:
        return self.U.shape[1]

    @property
    def residual(self) -> float:
        """``sqrt(Σ_{i>rank} σ_i²)``: the Frobenius error ‖W − U·V‖ (plain) or the output
        error ‖(W − U·V)·S‖ (whitened, w.r.t. the damped Gram) in exact arithmetic, before
        rounding the factors to the weight's dtype."""
        return float(self.singular_values[self.rank :].square().sum().sqrt())


def _compute_device(device: torch.device) -> torch.device:
    # MPS has no float64; everything else (CPU, CUDA, ...) does the work in place.
    return torch.device("cpu") if device.type == "mps" else device


def factorize_weight(
    weight: Tensor,
    rank: int | None = None,
    *,
    energy: float | None = None,
    ratio: float | None = None,
    calibration: Tensor | None = None,
    gram: Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
) -> Factorization:
    """Factorise ``weight`` (out, in) into ``U`` (out, r) @ ``V`` (r, in).

    Without ``calibration``/``gram``: truncated SVD ``W = P·Σ·Qᵀ``, ``U = P_r·√Σ_r``,
    ``V = √Σ_r·Q_rᵀ`` (Eckart–Young: ``‖W − U·V‖_F = sqrt(Σ_{i>r} σ_i²)``, the minimum over
    all rank-r matrices).

    With ``calibration`` X (..., in) (flattened to (n, in)) or ``gram`` G = XᵀX (in, in):
    activation-aware SVD minimising ``‖(W − U·V)·Xᵀ‖_F``. With ``S`` from `whitening_factor`
    (``G + λI = S·Sᵀ``): SVD ``W·S = P·Σ·Qᵀ``, ``U = P_r·√Σ_r``, ``V = √Σ_r·Q_rᵀ·S⁻¹``
    (a triangular solve ``V·S = √Σ_r·Q_rᵀ``, never an explicit inverse). Since
    ``‖M·Xᵀ‖_F² = tr(M·G·Mᵀ) = ‖M·S‖_F²`` at λ = 0, the output error is exactly
    ``sqrt(Σ_{i>r} σ_i²)`` with σ the singular values of W·S, the optimum over all rank-r U·V.
    Note ``U·V = P_r·P_rᵀ·W`` (a projection of W), so ``‖U·V‖₂ ≤ ‖W‖₂`` however
    ill-conditioned G is. ``energy`` selects the rank on this whitened spectrum.
    Safeguards (see `whitening_factor`): float64, symmetrised G, relative damping ``damping``
    increased ×10 on Cholesky failure, eigen fallback; an all-zero G (dead inputs) warns and
    falls back to plain SVD.

    Args:
        weight: ``(out, in)`` floating tensor (any float dtype and device; MPS tensors are
            factorised on the CPU). Not modified; gradients are not tracked.
        rank / energy / ratio: exactly one, see `select_rank`.
        calibration: ``(..., in)`` calibration inputs; or
        gram: ``(in, in)`` their Gram matrix (e.g. `GramAccumulator.gram`); not both.
        damping: relative damping ``≥ 0`` of G (ignored without calibration).

    Returns:
        `Factorization` with U, V in the weight's dtype and device.
    """
    _validate_rank_args(rank, energy, ratio)
    damping = _check_damping(damping)
    if not isinstance(weight, Tensor):
        raise TypeError(f"weight must be a torch.Tensor, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    if not weight.is_floating_point():
        raise ValueError(f"weight must be a floating-point tensor, got {weight.dtype}")
    if calibration is not None and gram is not None:
        raise ValueError("give calibration or gram, not both")
    out_features, in_features = weight.shape
    max_rank = min(out_features, in_features)
    if rank is not None or ratio is not None:  # fail early, before any SVD
        select_rank(out_features, in_features, rank=rank, ratio=ratio)

    device = _compute_device(weight.device)
    W = weight.detach().to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(W).all()):
        raise ValueError("weight contains non-finite values (NaN or inf)")

    G = None
    if calibration is not None:
        if not isinstance(calibration, Tensor):
            raise TypeError(f"calibration must be a torch.Tensor, got {type(calibration).__name__}")
        if calibration.dim() < 1 or calibration.shape[-1] != in_features:
            raise ValueError(
                f"calibration must have shape (..., {in_features}), got {tuple(calibration.shape)}"
            )
        acc = GramAccumulator(in_features, device=device)
        acc.update(calibration)
        G = acc.gram
        if not bool(torch.isfinite(G).all()):
            raise ValueError("calibration contains non-finite values (NaN or inf)")
    elif gram is not None:
        G = _as_gram(gram, in_features, device)
    if G is not None:  # symmetrised by whitening_factor
        if not bool(G.any()):
            warnings.warn(
                "factorize_weight: the calibration Gram matrix is all zeros (dead inputs); "
                "falling back to plain truncated SVD",
                stacklevel=2,
            )
            G = None

    def pick(s: Tensor) -> int:
        return select_rank(
            out_features, in_features, rank=rank, energy=energy, ratio=ratio, singular_values=s
        )

    if G is None:
        P, s, Qh = torch.linalg.svd(W, full_matrices=False)
        r = min(pick(s), max_rank)
        root = s[:r].sqrt()
        U = P[:, :r] * root
        V = root[:, None] * Qh[:r]
        whitened, lam = False, None
    else:
        wh = whitening_factor(G, damping)
        S = wh.factor
        P, s, Qh = torch.linalg.svd(W @ S, full_matrices=False)
        r = min(pick(s), max_rank)
        root = s[:r].sqrt()
        U = P[:, :r] * root
        B = root[:, None] * Qh[:r]  # (r, in); V solves V·S = B
        if wh.lower_triangular:
            V = torch.linalg.solve_triangular(S, B, upper=False, left=False)
        else:
            V = torch.linalg.solve(S, B, left=False)
        whitened, lam = True, wh.damping

    U = U.to(device=weight.device, dtype=weight.dtype).contiguous()
    V = V.to(device=weight.device, dtype=weight.dtype).contiguous()
    return Factorization(U=U, V=V, singular_values=s, whitened=whitened, damping=lam)


def truncated_svd(
    weight: Tensor,
    rank: int | None = None,
    *,
    energy: float | None = None,
    ratio: float | None = None,
) -> tuple[Tensor, Tensor]:
    """Eckart–Young-optimal ``W ≈ U @ V``: ``U = P_r·√Σ_r`` (out, r), ``V = √Σ_r·Q_rᵀ`` (r, in)
    from the SVD ``W = P·Σ·Qᵀ`` computed in float64; returned in weight's dtype and device.
    ``‖W − U·V‖_F = sqrt(Σ_{i>r} σ_i²)``. Exactly one of rank/energy/ratio (`select_rank`)."""
    f = factorize_weight(weight, rank, energy=energy, ratio=ratio)
    return f.U, f.V


def activation_aware_svd(
    weight: Tensor,
    rank: int | None = None,
    *,
    energy: float | None = None,
    ratio: float | None = None,
    calibration: Tensor | None = None,
    gram: Tensor | None = None,
    damping: float = DEFAULT_DAMPING,
) -> tuple[Tensor, Tensor]:
    """Activation-aware ``W ≈ U @ V`` minimising ``‖(W − U·V)·Xᵀ‖_F`` for calibration inputs
    X (..., in) given as ``calibration`` or as ``gram = XᵀX`` (exactly one). See
    `factorize_weight` for the method and its numerical safeguards."""
    if (calibration is None) == (gram is None):
        raise ValueError("activation_aware_svd needs exactly one of calibration, gram")
    f = factorize_weight(
        weight,
        rank,
        energy=energy,
        ratio=ratio,
        calibration=calibration,
        gram=gram,
        damping=damping,
    )
    return f.U, f.V


def relative_output_error(
    weight: Tensor, U: Tensor, V: Tensor, gram: Tensor | None = None
) -> float:
    """Relative error of the factorisation, in float64.

    Without ``gram``: ``‖W − U·V‖_F / ‖W‖_F``. With ``gram`` G = XᵀX:
    ``‖(W − U·V)·Xᵀ‖_F / ‖W·Xᵀ‖_F = sqrt(tr(E·G·Eᵀ) / tr(W·G·Wᵀ))``, E = W − U·V.
    Returns 0.0 when both numerator and denominator vanish.
    """
    device = _compute_device(weight.device)
    W = weight.detach().to(device=device, dtype=torch.float64)
    E = W - U.detach().to(device=device, dtype=torch.float64) @ V.detach().to(
        device=device, dtype=torch.float64
    )
    if gram is None:
        num = float(E.square().sum())
        den = float(W.square().sum())
    else:
        G = _as_gram(gram, W.shape[1], device)
        num = max(float(((E @ G) * E).sum()), 0.0)
        den = max(float(((W @ G) * W).sum()), 0.0)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)
