"""Heal losses, per predicted token, averaged over the batch.

- ``kd``: forward KL, ``KL(teacher || student)``, between the next-token distributions, both coarsened to the
  teacher's top-k tokens plus one bucket for all the others. With ``p`` the teacher's top-k probabilities,
  ``r = 1 - sum(p)`` its remaining mass, and ``q``, ``q_rest`` the student's probabilities of the same
  tokens and of all the others::

      KD = sum_i p_i (log p_i - log q_i) + r (log r - log q_rest)

  This is the exact KL of the coarsened distributions (never more than the full KL, and equal to it when the
  teacher puts no mass outside its top k). ``log q_rest`` is a log-sum-exp over the student's logits with the
  top-k masked out, so it stays finite and its gradient exact however small the rest is. With temperature
  ``T`` both sides are softened by ``T`` and the loss is multiplied by ``T**2`` (gradients keep their scale).
- ``lm``: cross-entropy of the student on the data's next tokens.
- ``kd+lm``: their mean, ``(kd + lm) / 2``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .settings import LOSSES  # noqa: F401 - the names live with the settings


def kd_topk(student_logits: torch.Tensor, t_idx: torch.Tensor, t_logp: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Mean coarsened KL(teacher || student) over positions. ``student_logits`` [B, P, V]; ``t_idx`` [B, P, k]
    (long) and ``t_logp`` [B, P, k]: the teacher's top-k tokens and their log-probabilities at ``temperature``."""
    s = student_logits.float() / temperature
    lse = torch.logsumexp(s, dim=-1)
    s_top = s.gather(-1, t_idx) - lse.unsqueeze(-1)
    s_rest = torch.logsumexp(s.scatter(-1, t_idx, float("-inf")), dim=-1) - lse
    p = t_logp.exp()
    r = (1.0 - p.sum(-1)).clamp_min(0.0)
    rest = torch.where(r > 0, r * (torch.log(r.clamp_min(1e-30)) - s_rest), torch.zeros_like(r))
    kl = (p * (t_logp - s_top)).sum(-1) + rest
    return kl.mean() * temperature ** 2


def lm_loss(student_logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), targets.reshape(-1))


def heal_loss(kind: str, logits: torch.Tensor, ids: torch.Tensor, teacher=None, temperature: float = 1.0) -> torch.Tensor:
    """The loss ``kind`` for full-row logits [B, S, V] of rows ``ids`` [B, S]; ``teacher`` = (idx, logp) of
    the S - 1 predicted positions when the loss needs it."""
    logits = logits[:, :-1]
    parts = []
    if kind in ("kd", "kd+lm"):
        parts.append(kd_topk(logits, teacher[0], teacher[1], temperature))
    if kind in ("lm", "kd+lm"):
        parts.append(lm_loss(logits, ids[:, 1:]))
    return sum(parts) / len(parts)
