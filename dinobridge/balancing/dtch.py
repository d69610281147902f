"""DTCH-SK: Dual-Temperature Cumulative-History Sinkhorn-Knopp teacher targets (reference §2.1).

Sinkhorn-Knopp on the current (global) batch plus one "history pseudo-column" that carries the soft demand of the
last ~N_cap samples, so balance is enforced over a window of samples instead of one small batch. Balancing runs on
soft logits z / (s·τ) and the result is sharpened with a power p (default p = s). With an empty history and
s = p = 1 the output is bit-for-bit the `SinkhornKnopp` balancer.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import Tensor

from dinobridge.balancing.base import Balancer, all_reduce, register_balancer
from dinobridge.balancing.sinkhorn import exp_shifted, sinkhorn_scale
from dinobridge.distributed.comm import world_size

__all__ = ["DTCHSinkhorn", "build_dtch_balancer", "HISTORY_MODES"]

_TINY = torch.finfo(torch.float32).tiny  # guards 0/0 only (underflowed rows, empty history)
HISTORY_MODES = ("ema", "window")


@register_balancer("dtch", "dtch_sk")
class DTCHSinkhorn(Balancer):
    """Sinkhorn-Knopp with a cumulative-history pseudo-column, soft scale s and power p.

    Forward (no grad, fp32 whatever the input dtype), with B the global number of rows (all-reduced `n_samples`
    when given, else n * world_size):
      Z = L / (s·τ); Q = exp(Z - max) [K, n], Q /= ΣQ;  H = λ·n_hist;  hcol = (H/B)·hist/n_hist  [K]
      repeat n_iterations: row = all_reduce(ΣQ over samples) + hcol; Q /= row, hcol /= row (both /= K/(1 + H/B));
                           Q /= colsum(Q), Q /= B;  hcol rescaled to total mass H/B
      q = (Q·B)^T (rows sum to 1);  if p != 1: q = softmax(p·log q)
      with update=True: push c = all_reduce(Σ_rows softmax(Z)) (sum(c) = B) into the history.

    History (buffers, identical on every rank since only globally reduced values are pushed; all fp32 except
    int64 bookkeeping, never fp64):
      hist [K], n_hist []: soft demand in sample units (each past sample adds a probability vector) and its total.
      "ema":    γ = max(0, 1 - B/N_cap); hist <- γ·hist + c; n_hist <- γ·n_hist + B   (n_hist -> N_cap).
      "window": ring [R, K] / ring_count [R] of per-step (c, B), write pointer `ptr`, `filled` slots; after each
                push the oldest slots are evicted until n_hist <= N_cap (the newest step is always kept), and
                hist / n_hist are recomputed as the ring sums. R = `window_slots`, or max(1, N_cap // B) from the
                first pushed step (allocated then; a checkpoint's ring size is adopted on load).
      N_cap = hist_cache * world_size (a per-rank-equivalent cache). hist_cache = 0: no history (plain SK with s, p).

    Shapes: teacher_logits [n, K] -> probs [n, K] fp32, requires_grad False. Every rank must call it (collectives
    run even with n = 0 rows). `update=False` reads the history without pushing (e.g. a second use of the targets).
    """

    def __init__(
        self,
        n_prototypes: int,
        hist_cache: int = 40000,
        history_mode: str = "ema",
        soft_scale: float = 1.0,
        power: Optional[float] = None,
        hist_weight: float = 1.0,
        n_iterations: int = 3,
        window_slots: Optional[int] = None,
        group: Optional[Any] = None,
    ) -> None:
        super().__init__(group)
        if n_prototypes < 1:
            raise ValueError(f"DTCHSinkhorn: n_prototypes must be >= 1, got {n_prototypes}")
        if hist_cache < 0:
            raise ValueError(f"DTCHSinkhorn: hist_cache must be >= 0 samples, got {hist_cache}")
        if history_mode not in HISTORY_MODES:
            raise ValueError(f"DTCHSinkhorn: history_mode must be one of {HISTORY_MODES}, got {history_mode!r}")
        if not soft_scale >= 1.0:
            raise ValueError(f"DTCHSinkhorn: soft_scale must be >= 1, got {soft_scale}")
        if power is not None and not power > 0:
            raise ValueError(f"DTCHSinkhorn: power must be > 0 or None (= soft_scale), got {power}")
        if not hist_weight >= 0:
            raise ValueError(f"DTCHSinkhorn: hist_weight must be >= 0, got {hist_weight}")
        if n_iterations < 1:
            raise ValueError(f"DTCHSinkhorn: n_iterations must be >= 1, got {n_iterations}")
        if window_slots is not None and window_slots < 1:
            raise ValueError(f"DTCHSinkhorn: window_slots must be >= 1 or None, got {window_slots}")
        self.n_prototypes = int(n_prototypes)
        self.hist_cache = int(hist_cache)
        self.history_mode = history_mode
        self.soft_scale = float(soft_scale)
        self.power = float(soft_scale if power is None else power)
        self.hist_weight = float(hist_weight)
        self.n_iterations = int(n_iterations)
        self.window_slots = window_slots
        k = self.n_prototypes
        self.register_buffer("hist", torch.zeros(k))
        self.register_buffer("n_hist", torch.zeros(()))
        r = window_slots if (history_mode == "window" and window_slots) else 0
        self.register_buffer("ring", torch.zeros(r, k))
        self.register_buffer("ring_count", torch.zeros(r))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ targets
    @torch.no_grad()
    def forward(
        self,
        teacher_logits: Tensor,
        teacher_temp: float,
        n_samples: Optional[Tensor] = None,
        update: bool = True,
    ) -> Tensor:
        if teacher_temp <= 0:
            raise ValueError(f"DTCHSinkhorn: teacher_temp must be > 0, got {teacher_temp}")
        logits = self._checked(teacher_logits)
        b_tot = self.global_count(logits.shape[0], n_samples, logits.device)
        probs = self._balance(logits, float(teacher_temp), b_tot)
        if update:  # read-only calls (PatchRoll's patch targets) skip the soft demand and its [n, K] softmax
            self.push(self._demand(logits / (self.soft_scale * float(teacher_temp))), b_tot)
        return probs

    def _checked(self, logits: Tensor) -> Tensor:
        if logits.ndim != 2 or logits.shape[1] != self.n_prototypes:
            raise ValueError(
                f"DTCHSinkhorn: teacher_logits must be [n, {self.n_prototypes}], got shape {tuple(logits.shape)}")
        return logits.detach().float()

    def _balance(self, logits: Tensor, teacher_temp: float, b_tot: Tensor) -> Tensor:
        """Sinkhorn-Knopp over the global batch + history pseudo-column; logits [n, K] fp32 -> q [n, K]."""
        h_mass = (self.hist_weight * self.n_hist) / b_tot  # H / B: pseudo-column mass (current batch mass = 1)
        hcol = h_mass * self.hist / self.n_hist.clamp_min(_TINY)  # [K]; zero with an empty history
        # E is built from the logits exactly as plain SK builds it, so an empty history (or hist_weight 0) gives
        # targets bit-identical to SinkhornKnopp's
        e = exp_shifted(logits, self.soft_scale * teacher_temp, self.group)
        q = sinkhorn_scale(e, b_tot, self.n_iterations, self.group, hist_col=hcol, hist_mass=h_mass)
        if self.power != 1.0:  # sharpening: softmax(p · log q_bal); with p = s this is softmax(L/τ + s·log u)
            q = torch.softmax(self.power * torch.log(q.clamp_min(_TINY)), dim=-1)
        return q.contiguous()

    def _demand(self, z: Tensor) -> Tensor:
        """Global pre-balance soft demand c [K] = Σ_rows softmax(z); sum(c) = global number of rows."""
        return all_reduce(torch.softmax(z, dim=-1).sum(dim=0), "sum", self.group)

    # ------------------------------------------------------------------ history
    def n_cap(self) -> int:
        """History capacity in samples: hist_cache * world_size."""
        return self.hist_cache * world_size(self.group)

    @torch.no_grad()
    def update(
        self, teacher_logits: Tensor, n_samples: Optional[Tensor] = None, teacher_temp: Optional[float] = None
    ) -> None:
        """Push this batch's soft demand into the history without computing targets (collective)."""
        if teacher_temp is None or teacher_temp <= 0:
            raise ValueError(f"DTCHSinkhorn.update: teacher_temp must be a temperature > 0, got {teacher_temp}")
        logits = self._checked(teacher_logits)
        b_tot = self.global_count(logits.shape[0], n_samples, logits.device)
        self.push(self._demand(logits / (self.soft_scale * float(teacher_temp))), b_tot)

    @torch.no_grad()
    def push(self, demand: Tensor, count: Tensor) -> None:
        """Add one step: `demand` [K] global soft mass (sum = count), `count` [] global number of samples.

        Both must be identical on every rank (globally reduced); the update is then identical everywhere.
        """
        n_cap = self.n_cap()
        if n_cap == 0:
            return
        demand = demand.to(self.hist.dtype)
        count = count.to(self.hist.dtype).reshape(())
        if self.history_mode == "ema":
            gamma = (1.0 - count / n_cap).clamp_min(0.0)
            self.hist.mul_(gamma).add_(demand)
            self.n_hist.mul_(gamma).add_(count)
            return
        if self.ring.shape[0] == 0:  # first push: size the ring (one host sync, once per run)
            first = float(count.item())
            if first <= 0:
                return
            slots = self.window_slots or max(1, int(n_cap // first))
            self.ring = self.hist.new_zeros(slots, self.n_prototypes)
            self.ring_count = self.hist.new_zeros(slots)
            self.ptr.zero_()
        self._push_window(demand, count, float(n_cap))

    def _push_window(self, demand: Tensor, count: Tensor, n_cap: float) -> None:
        r = self.ring.shape[0]
        valid = count > 0  # an empty step (no masked patch anywhere) does not take a slot
        idx = self.ptr.view(1)
        self.ring.index_copy_(0, idx, torch.where(valid, demand, self.ring[idx][0]).view(1, -1))
        self.ring_count.index_copy_(0, idx, torch.where(valid, count, self.ring_count[idx][0]).view(1))
        self.ptr.copy_(torch.where(valid, (self.ptr + 1) % r, self.ptr))
        # FIFO eviction: keep the newest slots whose cumulative count fits in n_cap (always the newest one)
        order = (self.ptr - 1 - torch.arange(r, device=self.ptr.device)) % r  # slot indices, newest first
        cum = self.ring_count[order].cumsum(0)
        keep_sorted = (cum <= n_cap) | (torch.arange(r, device=cum.device) == 0)
        keep = torch.empty_like(keep_sorted).scatter_(0, order, keep_sorted)
        self.ring.mul_(keep[:, None].to(self.ring.dtype))
        self.ring_count.mul_(keep.to(self.ring_count.dtype))
        self.filled.copy_((self.ring_count > 0).sum())
        self.hist.copy_(self.ring.sum(dim=0))
        self.n_hist.copy_(self.ring_count.sum())

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:  # type: ignore[override]
        # the window ring is sized at the first push: adopt the checkpoint's size before loading into it
        ring = state_dict.get(prefix + "ring")
        count = state_dict.get(prefix + "ring_count")
        if (ring is not None and count is not None and ring.ndim == 2 and ring.shape[1] == self.n_prototypes
                and count.shape == ring.shape[:1] and ring.shape != self.ring.shape):
            self.ring = self.hist.new_zeros(ring.shape)
            self.ring_count = self.hist.new_zeros(count.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"n_prototypes={self.n_prototypes}, hist_cache={self.hist_cache}, history_mode={self.history_mode}, "
                f"soft_scale={self.soft_scale}, power={self.power}, hist_weight={self.hist_weight}, "
                f"n_iterations={self.n_iterations}")


def build_dtch_balancer(dtch_cfg: Any, n_prototypes: int, kind: str, group: Optional[Any] = None) -> DTCHSinkhorn:
    """DTCH-SK for the DINO-CLS (`kind="cls"`, cache `dtch.cls_hist_cache`) or iBOT-patch (`kind="patch"`, cache
    `dtch.patch_hist_cache`) targets from the `dtch:` config block (DictConfig, dataclass or any attribute object)."""
    caches = {"cls": "cls_hist_cache", "patch": "patch_hist_cache"}
    if kind not in caches:
        raise ValueError(f"build_dtch_balancer: kind must be 'cls' or 'patch', got {kind!r}")
    power = getattr(dtch_cfg, "power", None)
    hist_cache = getattr(dtch_cfg, caches[kind], 40000)
    return DTCHSinkhorn(
        n_prototypes=int(n_prototypes),
        hist_cache=int(hist_cache or 0),
        history_mode=str(getattr(dtch_cfg, "history_mode", "ema")),
        soft_scale=float(getattr(dtch_cfg, "soft_scale", 1.0)),
        power=None if power is None else float(power),
        hist_weight=float(getattr(dtch_cfg, "hist_weight", 1.0)),
        n_iterations=int(getattr(dtch_cfg, "n_iterations", 3)),
        group=group,
    )
