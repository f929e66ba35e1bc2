"""Distillation losses: each component a small named module returning one UNREDUCED value per position.

Conventions (docs/distillation.md has the long form):

- Positions. A training position j of a user is "the state before item j predicts item j (next_item),
  and item j's rating / like". The teacher cache is target-aligned the same way, so a position has
  teacher labels iff its user is one of the cached users (`has_teacher`); the share of labelled
  positions that have them is the teacher coverage reported by the student stage.
- Temperature. NextItemKL returns T^2 * KL(p_teacher^T || p_student^T) with p^T = softmax(logits / T)
  (Hinton et al. 2015). d KL / d s_i = (p_s,i - p_t,i) / T, and for large T (p_s - p_t) ~ (s - t) / (N T),
  so the raw KL gradient shrinks like 1 / T^2; the T^2 factor keeps the soft-target gradient on the
  scale of the hard-label gradient whatever T is (and T = 1 is the plain KL).
- Support. 'topk': the K items the cache kept per position (the teacher's renormalised top-K, the
  student's logits gathered at the same K items); 'catalog': every item, the teacher's logits rebuilt
  from the cached user vector: user_vector @ item_table.T + item_bias (`teacher_catalog_logits`).
- Mixing (`DistillationObjective`): per labelled position and task,
      L_task(pos) = (1 - alpha * h) * hard(pos) + alpha * h * KD_task(pos),   h = 1 if teacher-labelled
  with KD_next_item = w_kl * KL + w_list * ListMLE + w_rank * RankKD (RankingDistillation), KD_rating =
  w_rating * MSE, KD_like = w_like * BCE, averaged over the labelled positions of the batch; positions
  without teacher labels keep the hard loss alone. alpha = 0 (or every KD weight 0) is the student
  without the teacher. The task losses go to the loss-weighting strategy (distill.weighting, the
  teacher's objects); representation alignment is added outside it:
  total = weighting({task: L_task}) + w_align * mean_{teacher positions} align.
- Items excluded from training (the cold-start slice) are masked out of every softmax (hard CE, KL,
  ListMLE, RankKD) with a large negative logit, so neither their ID embedding nor their bias gets a gradient.
- Every component is logged unweighted: its mean over the positions it applies to.
- Sampled softmax (student.next_item_loss = 'sampled', for catalogs of 10^5+ items): the hard CE is
  `sampled_softmax_loss` over the positive + M negatives drawn per step from q (`NegativeSampler`) and shared by
  the batch, every negative logit corrected by - log(M q(item)) (logQ); the student never builds [P, N] logits.
  The next_item KD then reads the cached top-K only: KL on the teacher's top-K support, ListMLE as in the full
  mode, and RankingDistillation with its catalog log-normaliser replaced by the same logQ estimate over (the
  step's negatives ∪ the row's teacher top-K). Excluded items have q = 0: never drawn, never a gradient.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import StudentConfig

NEG = -1e4
"""Logit given to excluded items: exp(NEG - max) is exactly 0 in float32, and unlike -inf it never makes NaN."""


def teacher_catalog_logits(user_vector: torch.Tensor, item_table: torch.Tensor, item_bias: torch.Tensor) -> torch.Tensor:
    """The teacher's full-catalog next_item logits from the cache: [P, d] @ [N, d].T + [N] -> [P, N]."""
    return user_vector.float() @ item_table.float().T + item_bias.float()


POPULARITY_POWER = 0.75
"""q(i) ∝ (training count + 1)^0.75 for student.sampler='popularity' (word2vec's unigram^0.75, Mikolov 2013)."""


def sampling_distribution(kind: str, n_items: int, counts: Optional[torch.Tensor] = None,
                          exclude: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The proposal q [N] (float64, sums to 1) of the sampled negatives. 'uniform': 1 / (#items not excluded);
    'popularity': (counts + 1)^POPULARITY_POWER normalised (`counts` [N]: training events per item; the + 1
    keeps every trainable item drawable: the logQ estimate is unbiased only where q > 0). Excluded items
    (bool [N]) get q = 0: never drawn."""
    if kind == "uniform":
        w = torch.ones(n_items, dtype=torch.float64)
    elif kind == "popularity":
        if counts is None:
            raise ValueError("student.sampler=popularity needs the training item counts (fit_student passes "
                             "split.train_item_counts()); pass item_counts to DistillationObjective or use "
                             "student.sampler=uniform")
        counts = torch.as_tensor(counts, dtype=torch.float64).cpu()
        if counts.shape != (n_items,) or bool((counts < 0).any()):
            raise ValueError(f"item counts must be [{n_items}] and >= 0, got shape {tuple(counts.shape)}")
        w = (counts + 1.0) ** POPULARITY_POWER
    else:
        raise ValueError(f"unknown student.sampler {kind!r}; choose uniform or popularity")
    if exclude is not None:
        w = w.masked_fill(exclude.bool().cpu(), 0.0)
    if not w.sum() > 0:
        raise ValueError("every item is excluded from training: nothing to sample negatives from")
    return w / w.sum()


class NegativeSampler(nn.Module):
    """M negatives per call, drawn WITH replacement from q (the torch RNG: seeded by the stage), shared by every
    position of the batch; returns (ids [M], log_expected [M]) with log_expected = log(M q(id)), the log of the
    item's expected count among the M draws, which is what the logQ correction subtracts (Jean et al. 2015;
    Yi et al. 2019). With replacement the expected count is exactly M q; duplicates are kept (each draw is one
    term of the importance-sampling sum)."""

    def __init__(self, q: torch.Tensor, num_negatives: int):
        super().__init__()
        if int(num_negatives) < 1:
            raise ValueError(f"student.sampled_negatives must be >= 1, got {num_negatives}")
        self.m = int(num_negatives)
        self.register_buffer("q", q.float(), persistent=False)
        with torch.no_grad():
            log_expected = torch.log(q.double() * self.m).float()  # -inf where q = 0: never drawn
        self.register_buffer("log_expected", log_expected, persistent=False)

    def forward(self) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.multinomial(self.q, self.m, replacement=True)
        return ids, self.log_expected[ids]


def sampled_softmax_loss(pos_logits: torch.Tensor, neg_logits: torch.Tensor, neg_log_expected: torch.Tensor,
                         hit: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The logQ-corrected sampled softmax cross-entropy per row:

        L = log( exp(s_pos) + sum_{j: n_j != pos} exp(s_{n_j} - log(M q(n_j))) ) - s_pos

    pos_logits [P]; neg_logits [P, M] at the negatives n_1..n_M; neg_log_expected [M] = log(M q(n_j));
    hit [P, M] bool: accidental hits (n_j = the row's positive), masked out. The positive is in the candidate set
    with certainty, once: its expected count is 1 and its correction log 1 = 0. Then the sum inside the log is an
    unbiased estimate of the catalog normaliser Z = sum_i exp(s_i) (Bengio & Senecal 2008), so L -> the full CE
    as M grows (biased low by Jensen at finite M), and with every item drawn once at q = 1/N (M q = 1) L IS the
    full CE. (TF's sampled_softmax_loss also subtracts log(M q(pos)) from the positive; its gradient then
    tends to the full CE's times 1 / (1 - p_pos) per row and its value to the full CE + log(M q(pos)).)
    """
    neg = neg_logits.float() - neg_log_expected.float()
    if hit is not None:
        neg = neg.masked_fill(hit, NEG)
    pos = pos_logits.float()
    return torch.logsumexp(torch.cat([pos.unsqueeze(-1), neg], dim=-1), dim=-1) - pos


def _member(ids: torch.Tensor, lists: torch.Tensor) -> torch.Tensor:
    """[P, M] bool: ids[j] (shared, [M]) is one of row p's lists[p] ([P, K]); O(P M log K) time, O(P M) memory."""
    srt = torch.sort(lists, dim=-1).values
    at = torch.searchsorted(srt, ids.expand(lists.shape[0], -1).contiguous()).clamp_max(lists.shape[-1] - 1)
    return torch.gather(srt, -1, at) == ids


def _repeats(ids: torch.Tensor) -> torch.Tensor:
    """[M] bool: ids[j] already occurred at an earlier j' < j."""
    srt, order = torch.sort(ids, stable=True)
    dup = torch.zeros_like(ids, dtype=torch.bool)
    dup[order[1:]] = srt[1:] == srt[:-1]
    return dup


class NextItemKL(nn.Module):
    """T^2 * KL(softmax(teacher / T) || softmax(student / T)) per row (module docstring: the T^2 convention).

    forward(student_logits [P, S], teacher_logits [P, S], valid [P, S] bool or None) -> [P].
    S is the support: the teacher's top-K items (student logits gathered there) or the whole catalog.
    Entries with valid = False take part in neither distribution (both get probability 0); a row with no
    valid entry gives 0. KL = 0 exactly when the two tempered distributions match.
    """

    name = "next_item/kl"

    def __init__(self, temperature: float = 2.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"KD temperature must be > 0, got {temperature}")
        self.T = float(temperature)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        T = self.T
        s = student_logits.float() / T
        t = teacher_logits.detach().float() / T
        if valid is not None:
            s = s.masked_fill(~valid, NEG)
            t = t.masked_fill(~valid, NEG)
        log_p_t = torch.log_softmax(t, dim=-1)
        p_t = log_p_t.exp()
        kl = (p_t * (log_p_t - torch.log_softmax(s, dim=-1))).sum(-1)
        if valid is not None:
            kl = torch.where(valid.any(-1), kl, torch.zeros_like(kl))
        return (T * T) * kl


class ListwiseRankingLoss(nn.Module):
    """ListMLE (Xia et al. 2008): -log of the Plackett-Luce probability of the teacher's top-k order
    under the student's scores, restricted to those k items, divided by the number of terms:

        L = (1 / k) * sum_{i=1..k} [ logsumexp(s_{pi_i}, ..., s_{pi_k}) - s_{pi_i} ]

    forward(student_scores [P, k] in the teacher's order (best first), valid [P, k] or None) -> [P].
    Invalid entries drop out of the order (and of every denominator). Only the order matters: the
    teacher's logit values are not used, so this complements the KL (which matches the values).
    """

    name = "next_item/listwise"

    def __init__(self, top_k: int = 10):
        super().__init__()
        if top_k < 2:
            raise ValueError(f"listwise_top_k must be >= 2 (an order needs two items), got {top_k}")
        self.top_k = int(top_k)

    def forward(self, student_scores: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        s = student_scores[..., : self.top_k].float()
        v = torch.ones_like(s, dtype=torch.bool) if valid is None else valid[..., : self.top_k]
        s = s.masked_fill(~v, NEG)
        # suffix logsumexp: lse_i = log sum_{j >= i} exp(s_j)
        lse = torch.logcumsumexp(s.flip(-1), dim=-1).flip(-1)
        terms = torch.where(v, lse - s, torch.zeros_like(s))
        return terms.sum(-1) / v.sum(-1).clamp_min(1)


def _row_normalise(w: torch.Tensor) -> torch.Tensor:
    """w / its row sum; an all-zero row stays all zero."""
    return w / w.sum(-1, keepdim=True).clamp_min(1e-12)


class RankingDistillation(nn.Module):
    """Importance-weighted top-k ranking distillation (DLLM2Rec, Cui et al. 2024): the student's catalog
    cross-entropy on each of the teacher's first k items, weighted by how much that item should count:

        L = - sum_k w_k * log softmax(student catalog logits)[i_k] / sum_k w_k
        w_k = g_pos * w^p_k + g_conf * w^c_k + g_cons * w^o_k
        w^p_k ∝ exp(-rank_k / lambda), rank_k = 0 .. k-1    position: the teacher's order
        w^c_k = softmax(teacher's top-k logits)_k             confidence: the teacher's own probability (T = 1)
        w^o_k ∝ 1[i_k in the student's current top-k]         consistency: items the student already ranks high

    Each part is normalised to sum 1 over the row's valid entries (a consistency part with no overlap stays 0),
    so only the ratios of the g's matter. DLLM2Rec's confidence is exp(-distance) of its grounding step (its
    LLM generates text); ours is the cached teacher's probability, which plays the same role. All weights
    are detached: the gradient is exactly that of a cross-entropy against the fixed distribution w / sum w.

    forward(student_logits [P, N] over the catalog, t_items [P, K] best first, t_logits [P, K],
    valid [P, K] bool or None) -> [P]. Items excluded from training must already be at NEG in
    student_logits (DistillationObjective does that); entries with valid = False get weight 0, so neither
    they nor the softmax normaliser get a gradient from them; a row with no valid entry gives 0.
    """

    name = "next_item/rank_kd"

    def __init__(self, top_k: int = 10, lam: float = 1.0, gammas: tuple = (0.3, 0.5, 0.1)):
        super().__init__()
        if int(top_k) < 1:
            raise ValueError(f"student.rank_kd_top_k must be >= 1 (teacher items distilled per position), got "
                             f"{top_k}; use e.g. 10 (at most teacher.cache_top_k)")
        if not lam > 0:
            raise ValueError(f"student.rank_kd_lambda must be > 0 (position weight exp(-rank / lambda)), got {lam}; "
                             f"use e.g. 1.0 (larger = flatter over the ranks)")
        for part, g in zip(("position", "confidence", "consistency"), gammas):
            if not g >= 0:
                raise ValueError(f"student.rank_kd_gamma_{part} must be >= 0, got {g}; 0 drops the {part} weight")
        if sum(gammas) <= 0:
            raise ValueError("student.rank_kd_gamma_position / _confidence / _consistency are all 0, so every "
                             "importance weight is 0; set at least one > 0 (or kd_rank: 0 to switch the loss off)")
        self.top_k, self.lam = int(top_k), float(lam)
        self.gammas = tuple(float(g) for g in gammas)

    @torch.no_grad()
    def weights(self, student_logits: torch.Tensor, t_items: torch.Tensor, t_logits: torch.Tensor,
                valid: Optional[torch.Tensor] = None, support: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The importance weights w_k / sum_k w_k, [P, k] (k = min(top_k, K)); 0 on invalid entries.
        `support` [P, S]: the item ids of student_logits' columns (None: column = item id, the catalog)."""
        items, t = t_items[..., : self.top_k], t_logits[..., : self.top_k].float()
        k = items.shape[-1]
        v = torch.ones_like(items, dtype=torch.bool) if valid is None else valid[..., : self.top_k]
        rank = torch.arange(k, dtype=torch.float32, device=items.device)
        w_pos = _row_normalise(torch.exp(-rank / self.lam).expand(items.shape) * v)
        w_conf = torch.softmax(t.masked_fill(~v, NEG), dim=-1) * v  # a row with no valid entry: 0
        s_top = torch.topk(student_logits.float(), min(k, student_logits.shape[-1]), dim=-1).indices
        if support is not None:
            s_top = torch.gather(support, -1, s_top)
        w_cons = _row_normalise(((items[..., :, None] == s_top[..., None, :]).any(-1) & v).float())
        g_p, g_c, g_o = self.gammas
        return _row_normalise(g_p * w_pos + g_c * w_conf + g_o * w_cons)

    def forward(self, student_logits: torch.Tensor, t_items: torch.Tensor, t_logits: torch.Tensor,
                valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        w = self.weights(student_logits, t_items, t_logits, valid)
        s = student_logits.float()
        log_p = torch.gather(s, -1, t_items[..., : self.top_k]) - torch.logsumexp(s, dim=-1, keepdim=True)
        return -(w * log_p).sum(-1)  # w already sums to 1 (or 0: a row with no valid entry)

    def forward_sampled(self, s_items: torch.Tensor, t_items: torch.Tensor, t_logits: torch.Tensor,
                        valid: Optional[torch.Tensor], neg_ids: torch.Tensor, neg_logits: torch.Tensor,
                        neg_log_expected: torch.Tensor) -> torch.Tensor:
        """The loss with the catalog log-normaliser replaced by its logQ estimate (student.next_item_loss=sampled):

            log Z ~ log( sum_{k in top-K} exp(s_{i_k}) + sum_{j: n_j not in top-K} exp(s_{n_j} - log(M q(n_j))) )

        s_items [P, K]: the student's logits at the row's teacher top-K (all K cached items, exact terms; invalid
        ones at NEG); neg_ids [M], neg_logits [P, M], neg_log_expected [M]: the step's shared negatives. The sum
        is an unbiased estimate of Z as in sampled_softmax_loss. The consistency weight compares the teacher's
        items with the student's top-k among these candidates (the catalog top-k is not computed), so it counts
        a teacher item that is in the candidate top-k but not in the catalog top-k as consistent."""
        s = s_items.float()
        in_top = _member(neg_ids, t_items)  # [P, M]: drawn negatives that are already exact terms
        neg = neg_logits.float()
        log_z = torch.logsumexp(torch.cat([s, (neg - neg_log_expected).masked_fill(in_top, NEG)], dim=-1),
                                dim=-1, keepdim=True)
        with torch.no_grad():  # the candidate list the student's top-k is taken from: each item once
            cand = torch.cat([s, neg.masked_fill(in_top | _repeats(neg_ids), NEG)], dim=-1)
            support = torch.cat([t_items, neg_ids.expand(t_items.shape[0], -1)], dim=-1)
        w = self.weights(cand, t_items, t_logits, valid, support=support)
        return -(w * (s[..., : self.top_k] - log_z)).sum(-1)


class LikeBCE(nn.Module):
    """BCE(student like logit, sigmoid(teacher like logit)) per position: soft-label binary cross-entropy.
    Its minimum (gradient 0) is at student logit = teacher logit, where it equals the teacher's entropy."""

    name = "like/kd"

    def forward(self, student_logit: torch.Tensor, teacher_logit: torch.Tensor) -> torch.Tensor:
        return F.binary_cross_entropy_with_logits(student_logit.float(), torch.sigmoid(teacher_logit.detach().float()),
                                                  reduction="none")


class RatingMSE(nn.Module):
    """(student rating - teacher rating)^2 per position."""

    name = "rating/kd"

    def forward(self, student_rating: torch.Tensor, teacher_rating: torch.Tensor) -> torch.Tensor:
        return (student_rating.float() - teacher_rating.detach().float()) ** 2


class RepresentationAlignment(nn.Module):
    """Projector (student state [.., d_s] -> teacher user-vector dim d_t) + a distance to the teacher vector.

    kind 'cosine': 1 - cos(P s, t) (scale-free; in [0, 2]); 'mse': mean over dims of (P s - t)^2.
    The teacher vector is detached: gradients reach only the student and the projector. The projector is
    a training-time module (not part of the served student, not in its parameter count).
    """

    name = "align"

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "cosine"):
        super().__init__()
        if kind not in ("cosine", "mse"):
            raise ValueError(f"unknown align_loss '{kind}'; choose cosine or mse")
        self.kind = kind
        self.proj = nn.Linear(student_dim, teacher_dim)

    def forward(self, student_state: torch.Tensor, teacher_vector: torch.Tensor) -> torch.Tensor:
        p = self.proj(student_state)
        t = teacher_vector.detach().float()
        if self.kind == "cosine":
            return 1 - F.cosine_similarity(p, t, dim=-1, eps=1e-8)
        return ((p - t) ** 2).mean(-1)


class DistillationObjective(nn.Module):
    """Hard-label losses, the enabled KD components and their mixing, for one batch of positions.

    forward(out, batch) -> (task_losses {task: scalar}, align scalar or None, logged {name: float})
      out    Student.forward_positions(..., select=batch["labelled"]) outputs, flat over the P labelled
             positions: next_item [P, N], rating/like [P, 1], state [P, d]
      batch  items / ratings / labelled / has_teacher [B, L]; with a teacher also t_items / t_logits
             [B, L, K], t_rating / t_like [B, L], t_user [B, L, d_t] (the cached teacher user vector)
    `use_teacher=False` (or kd_alpha = 0) gives the hard-label objective of the no-KD student.

    cfg.next_item_loss = 'sampled': `out` is forward_positions(..., catalog=False) (user_vector [P, d] and the
    score_items scorer instead of next_item [P, N]); every step draws cfg.sampled_negatives negatives from
    `sampling_distribution(cfg.sampler, ...)` (`item_counts` [N], the training events per item, for 'popularity')
    and the hard CE is sampled_softmax_loss. KD: KL on the teacher's top-K (scope 'topk'), ListMLE unchanged, and
    RankingDistillation.forward_sampled (its normaliser estimated over the negatives ∪ the row's top-K).
    """

    def __init__(self, cfg: StudentConfig, tasks: list[str], student_dim: int, like_threshold: float = 4.0,
                 use_teacher: bool = True, teacher_dim: Optional[int] = None,
                 item_table: Optional[torch.Tensor] = None, item_bias: Optional[torch.Tensor] = None,
                 exclude_items: Optional[torch.Tensor] = None, item_counts: Optional[torch.Tensor] = None,
                 n_items: Optional[int] = None):
        super().__init__()
        self.tasks, self.like_threshold = list(tasks), float(like_threshold)
        self.alpha = float(cfg.kd_alpha) if use_teacher else 0.0
        on = self.alpha > 0
        if not cfg.kd_rank >= 0:
            raise ValueError(f"student.kd_rank must be >= 0 (weight of the ranking distillation), got {cfg.kd_rank}; "
                             f"0 switches it off")
        self.w = dict(kl=cfg.kd_next_item if on else 0.0, listwise=cfg.kd_listwise if on else 0.0,
                      rank=cfg.kd_rank if on else 0.0,
                      rating=cfg.kd_rating if on and "rating" in tasks else 0.0,
                      like=cfg.kd_like if on and "like" in tasks else 0.0,
                      align=cfg.kd_align if use_teacher and teacher_dim else 0.0)
        if cfg.kd_scope not in ("auto", "topk", "catalog"):
            raise ValueError(f"unknown student.kd_scope '{cfg.kd_scope}'; choose auto, topk or catalog")
        has_catalog = item_table is not None and item_bias is not None
        if cfg.next_item_loss not in ("full", "sampled"):
            raise ValueError(f"unknown student.next_item_loss {cfg.next_item_loss!r}; choose full or sampled")
        self.sampled = cfg.next_item_loss == "sampled"
        if self.sampled and cfg.kd_scope == "catalog":
            raise ValueError("student.kd_scope=catalog needs the student's [P, N] catalog logits, which "
                             "student.next_item_loss=sampled never computes; set student.kd_scope=topk (or auto) "
                             "or student.next_item_loss=full")
        if cfg.kd_scope == "catalog" and self.w["kl"] > 0 and not has_catalog:
            raise ValueError("student.kd_scope=catalog needs the cache's user_vector, item_table and item_bias")
        self.scope = "catalog" if not self.sampled and (
            cfg.kd_scope == "catalog" or (cfg.kd_scope == "auto" and has_catalog)) else "topk"
        self.kl = NextItemKL(cfg.temperature)
        self.listwise = ListwiseRankingLoss(cfg.listwise_top_k)
        self.rank_kd = RankingDistillation(cfg.rank_kd_top_k, cfg.rank_kd_lambda,
                                           (cfg.rank_kd_gamma_position, cfg.rank_kd_gamma_confidence,
                                            cfg.rank_kd_gamma_consistency))
        self.rating_kd, self.like_kd = RatingMSE(), LikeBCE()
        self.align = RepresentationAlignment(student_dim, teacher_dim, cfg.align_loss) if self.w["align"] > 0 else None
        if self.scope == "catalog" and self.w["kl"] > 0:
            self.register_buffer("t_item_table", item_table.float(), persistent=False)
            self.register_buffer("t_item_bias", item_bias.float(), persistent=False)
        if exclude_items is not None and bool(exclude_items.any()):
            self.register_buffer("exclude", exclude_items.bool(), persistent=False)
        else:
            self.exclude = None
        self.sampler = None
        if self.sampled:
            n = n_items if n_items is not None else next(
                (len(x) for x in (item_counts, exclude_items, item_bias) if x is not None), None)
            if n is None:
                raise ValueError("student.next_item_loss=sampled needs the catalog size: pass n_items "
                                 "(or item_counts) to DistillationObjective")
            q = sampling_distribution(cfg.sampler, int(n), item_counts, exclude_items)
            self.sampler = NegativeSampler(q, cfg.sampled_negatives)
        self.sampler_kind = cfg.sampler

    @property
    def needs_user_vectors(self) -> bool:
        return self.align is not None or (self.scope == "catalog" and self.w["kl"] > 0)

    def components(self) -> dict[str, float]:
        """The KD component weights actually in force (0 = off), plus alpha and the KL support (and, with the
        sampled softmax, its sampler and number of negatives)."""
        extra = dict(next_item_loss="sampled", sampler=self.sampler_kind, sampled_negatives=self.sampler.m) \
            if self.sampled else {}
        return dict(alpha=self.alpha, scope=self.scope, **{k: float(v) for k, v in self.w.items()}, **extra)

    def forward(self, out: dict, batch: dict):
        m = batch["labelled"]
        if self.sampled and "score_items" not in out:
            raise ValueError("student.next_item_loss=sampled expects forward_positions(..., catalog=False) outputs "
                             "(user_vector + score_items), not the catalog logits")
        logits = None if self.sampled else out["next_item"]  # [P, N], P = labelled positions
        if (out["user_vector"] if self.sampled else logits).shape[0] != int(m.sum()):
            raise ValueError("DistillationObjective expects outputs at the labelled positions only: call "
                             "forward_positions(..., select=batch['labelled'])")
        target = batch["items"][m]
        negatives = None
        if self.sampled:
            negatives = self._negatives(out)
            neg_ids, neg_log_expected, neg_logits = negatives
            pos = out["score_items"](out["user_vector"], target.unsqueeze(-1))[:, 0]
            hit = neg_ids.unsqueeze(0) == target.unsqueeze(-1)  # accidental hits
            hard = {"next_item": sampled_softmax_loss(pos, neg_logits, neg_log_expected, hit)}
        else:
            if self.exclude is not None:
                logits = logits.masked_fill(self.exclude, NEG)
            hard = {"next_item": F.cross_entropy(logits, target, reduction="none")}
        if "rating" in self.tasks:
            r_true = batch["ratings"][m]
            hard["rating"] = (out["rating"][..., 0] - r_true) ** 2
            hard["like"] = F.binary_cross_entropy_with_logits(
                out["like"][..., 0], (r_true >= self.like_threshold).float(), reduction="none")
        logged = {f"{t}/hard": v.detach().mean().item() for t, v in hard.items()}
        h = batch["has_teacher"][m] if self.alpha > 0 or self.align is not None else None
        kd: dict[str, torch.Tensor] = {}
        n_t = int(h.sum()) if h is not None else 0
        if self.alpha > 0 and n_t:
            kd = self._kd_terms(out, batch, m, h, logits, logged, negatives)
        losses = {}
        for t in self.tasks:
            if t in kd:
                mix = hard[t].clone()
                mix[h] = (1 - self.alpha) * hard[t][h] + self.alpha * kd[t]
                losses[t] = mix.mean()
            else:
                losses[t] = hard[t].mean()
        align = None
        if self.align is not None and n_t:
            a = self.align(out["state"][h], batch["t_user"][m][h])
            logged["align"] = a.detach().mean().item()
            align = self.w["align"] * a.mean()
        return losses, align, logged

    def _negatives(self, out: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """This step's shared negatives: (ids [M], log(M q(ids)) [M], the student's logits there [P, M])."""
        ids, log_expected = self.sampler()
        return ids, log_expected, out["score_items"](out["user_vector"], ids)

    def _kd_terms(self, out, batch, m, h, logits, logged, negatives=None) -> dict[str, torch.Tensor]:
        """KD term per task on the teacher-labelled positions (rows of `logits`, or of the sampled scores, where h)."""
        kd = {}
        t_items = batch["t_items"][m][h]  # [P_t, K], the teacher's top-K, best first
        valid = None if self.exclude is None else ~self.exclude[t_items]
        if self.sampled:
            terms = self._next_item_kd_sampled(out, batch, m, h, t_items, valid, negatives, logged)
        else:
            terms = self._next_item_kd(logits[h], batch, m, h, t_items, valid, logged)
        if terms:
            kd["next_item"] = sum(terms)
        if self.w["rating"] > 0:
            r = self.rating_kd(out["rating"][..., 0][h], batch["t_rating"][m][h])
            logged[self.rating_kd.name] = r.detach().mean().item()
            kd["rating"] = self.w["rating"] * r
        if self.w["like"] > 0:
            lk = self.like_kd(out["like"][..., 0][h], batch["t_like"][m][h])
            logged[self.like_kd.name] = lk.detach().mean().item()
            kd["like"] = self.w["like"] * lk
        return kd

    def _next_item_kd(self, s_all, batch, m, h, t_items, valid, logged) -> list[torch.Tensor]:
        """The weighted next_item KD terms over the catalog logits s_all [P_t, N] (excluded items already at NEG)."""
        terms = []
        if self.w["kl"] > 0:
            if self.scope == "catalog":
                t_logits = teacher_catalog_logits(batch["t_user"][m][h], self.t_item_table, self.t_item_bias)
                cat_valid = None if self.exclude is None else (~self.exclude).expand_as(s_all)
                kl = self.kl(s_all, t_logits, cat_valid)
            else:
                kl = self.kl(torch.gather(s_all, -1, t_items), batch["t_logits"][m][h], valid)
            logged[self.kl.name] = kl.detach().mean().item()
            terms.append(self.w["kl"] * kl)
        if self.w["listwise"] > 0:
            k = self.listwise.top_k
            lw = self.listwise(torch.gather(s_all, -1, t_items[:, :k]), None if valid is None else valid[:, :k])
            logged[self.listwise.name] = lw.detach().mean().item()
            terms.append(self.w["listwise"] * lw)
        if self.w["rank"] > 0:
            rk = self.rank_kd(s_all, t_items, batch["t_logits"][m][h], valid)
            logged[self.rank_kd.name] = rk.detach().mean().item()
            terms.append(self.w["rank"] * rk)
        return terms

    def _next_item_kd_sampled(self, out, batch, m, h, t_items, valid, negatives, logged) -> list[torch.Tensor]:
        """The same terms with the sampled softmax: the student scored at the teacher's top-K only (KL, ListMLE),
        RankingDistillation's normaliser estimated over the step's negatives ∪ the row's top-K."""
        if not (self.w["kl"] > 0 or self.w["listwise"] > 0 or self.w["rank"] > 0):
            return []
        s_top = out["score_items"](out["user_vector"][h], t_items)  # [P_t, K]
        if valid is not None:
            s_top = s_top.masked_fill(~valid, NEG)  # as the catalog path: excluded items at NEG, no gradient
        t_logits = batch["t_logits"][m][h]
        terms = []
        if self.w["kl"] > 0:
            kl = self.kl(s_top, t_logits, valid)
            logged[self.kl.name] = kl.detach().mean().item()
            terms.append(self.w["kl"] * kl)
        if self.w["listwise"] > 0:
            k = self.listwise.top_k
            lw = self.listwise(s_top[:, :k], None if valid is None else valid[:, :k])
            logged[self.listwise.name] = lw.detach().mean().item()
            terms.append(self.w["listwise"] * lw)
        if self.w["rank"] > 0:
            neg_ids, neg_log_expected, neg_logits = negatives
            rk = self.rank_kd.forward_sampled(s_top, t_items, t_logits, valid, neg_ids, neg_logits[h],
                                              neg_log_expected)
            logged[self.rank_kd.name] = rk.detach().mean().item()
            terms.append(self.w["rank"] * rk)
        return terms
