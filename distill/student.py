"""The compact multi-head student (docs/protocol.md for the tasks and artifacts; shape in docs/distillation.md).

Inputs are LEFT-padded histories (the most recent interaction last) with explicit lengths:
  history_items   int64   [B, L]  internal item ids (padding: any valid id, ignored)
  history_ratings float32 [B, L]  1..5, 0 = unknown
  history_length  int64   [B]     number of real interactions (0 = empty history)
  candidates      int64   [B, C]  items to score for rating / like
Layout inside: a learned BOS token sits just before the first real item, so the sequence
[pad.. BOS i1 .. iL] has L+1 slots; state k sees BOS and the items up to k. The state before item j
predicts item j (next_item) and, joined with item j's vector, its rating and like (late interaction).
The last state is the user state for serving. An empty history still has BOS: no NaN.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .config import StudentConfig
from .mtl import build_mtl


class Block(nn.Module):
    """Pre-norm transformer block with explicit attention math (exports to plain ONNX ops at opset 20)."""

    def __init__(self, d: int, heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        if d % heads:
            raise ValueError(f"student.dim={d} must be divisible by student.heads={heads}")
        self.heads, self.dh = heads, d // heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ffn = nn.Sequential(nn.Linear(d, ffn_mult * d), nn.GELU(), nn.Linear(ffn_mult * d, d))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, allowed: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """x [B, T, d], allowed [B, T, T] (query, key) -> [B, T, d]; last_only: only the last query -> [B, 1, d].

        Serving reads only the last state, so the final block needs one query (keys and values still span the
        sequence): the same numbers as the full block's last row at ~1/T of its attention + FFN cost."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, self.dh).permute(2, 0, 3, 1, 4)
        if last_only:
            q, allowed, x = q[:, :, -1:], allowed[:, -1:], x[:, -1:]
        att = (q @ k.transpose(-1, -2)) / math.sqrt(self.dh)
        att = att.masked_fill(~allowed.unsqueeze(1), -1e9)  # finite fill: a row never becomes all -inf
        att = self.drop(torch.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, q.shape[2], d)
        x = x + self.drop(self.out(y))
        return x + self.drop(self.ffn(self.ln2(x)))


class PairTower(nn.Module):
    """Late interaction: user state [B, d] x candidate vectors [B, C, d] -> [B, C] (encoder runs once)."""

    def __init__(self, d: int, hidden: int):
        super().__init__()
        self.user = nn.Linear(d, hidden)
        self.item = nn.Linear(d, hidden)
        self.mix = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 1)

    def forward(self, z: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
        return self.combine(self.user(z), self.item(cand))

    def combine(self, u: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """u = user(z) [..., h], c = item(candidate vectors) [..., C, h] -> [..., C]. Two-part serving
        precomputes item(table) once per item (the item table's tower features) and runs only this part."""
        u = u.unsqueeze(-2)  # [..., 1, h]
        h = torch.relu(self.mix(torch.relu(u + c)) + u * c)
        return self.head(h).squeeze(-1)


class Student(nn.Module):
    def __init__(self, cfg: StudentConfig, n_items: int, tasks: list[str], text_vectors: Optional[torch.Tensor] = None,
                 rating_mean: float = 3.5):
        super().__init__()
        self.cfg, self.n_items, self.tasks = cfg, n_items, list(tasks)
        d = cfg.dim
        self.id_emb = nn.Embedding(n_items, d)
        nn.init.normal_(self.id_emb.weight, std=0.02)
        if cfg.use_text_vectors and text_vectors is not None:
            self.register_buffer("text_vectors", text_vectors.float().clone(), persistent=True)
            self.text_proj = nn.Linear(text_vectors.shape[1], d, bias=False)
        else:
            self.text_vectors, self.text_proj = None, None
        self.rating_emb = nn.Embedding(6, d)  # round(rating) in 1..5, 0 = unknown
        self.pos_emb = nn.Embedding(cfg.max_len + 1, d)
        self.bos = nn.Parameter(torch.zeros(d))
        self.blocks = nn.ModuleList(Block(d, cfg.heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(d)
        self.mtl = build_mtl(cfg.mtl, self.tasks, d, cfg.tower_hidden, cfg.dropout, cfg.n_experts,
                             n_shared_experts=cfg.n_shared_experts, levels=cfg.ple_levels)
        self.next_proj = nn.Linear(d, d)
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        if "rating" in self.tasks:
            self.rating_tower = PairTower(d, cfg.tower_hidden)
            self.register_buffer("rating_mean", torch.tensor(float(rating_mean)))
        if "like" in self.tasks:
            self.like_tower = PairTower(d, cfg.tower_hidden)
        self._frozen_table: Optional[torch.Tensor] = None
        self._id_drop: Optional[torch.Tensor] = None  # items whose ID is dropped in this training forward
        if not 0.0 <= cfg.id_dropout < 1.0:
            raise ValueError(f"student.id_dropout={cfg.id_dropout} must be in [0, 1)")

    # ------------------------------------------------------------------ item table
    def item_table(self) -> torch.Tensor:
        """[N, d] item vectors: ID embedding + projection of the frozen teacher text vector."""
        if self._frozen_table is not None:
            return self._frozen_table
        table = self.id_emb.weight
        self._draw_id_drop()
        if self._id_drop is not None:
            table = table.masked_fill(self._id_drop.unsqueeze(1), 0.0)
        if self.text_proj is not None:
            table = table + self.text_proj(self.text_vectors)
        return table

    def _draw_id_drop(self) -> None:
        """This training forward's ID-dropout mask (bool [N], `_id_drop`), or None outside training / without it."""
        self._id_drop = None
        if self.training and self.cfg.id_dropout > 0 and self.text_proj is not None:
            self._id_drop = torch.rand(self.n_items, device=self.id_emb.weight.device) < self.cfg.id_dropout

    def item_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` (any shape) of item_table(), [*ids.shape, d], computed for the distinct ids only: the sampled
        training path never builds the [N, d] table (its text projection alone is O(N)). Uses the ID-dropout
        mask of the current training forward (drawn by forward_positions); gradient reaches only these rows."""
        uniq, inv = torch.unique(ids, return_inverse=True)
        return self._rows(uniq)[0][inv]

    def _rows(self, uniq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(item vectors [U, d], biases [U]) of the items `uniq`, with this training forward's ID dropout."""
        bias = self.item_bias[uniq]
        if self._frozen_table is not None:
            return self._frozen_table[uniq], bias
        rows = self.id_emb(uniq)
        if self._id_drop is not None:
            drop = self._id_drop[uniq]
            rows = rows.masked_fill(drop.unsqueeze(1), 0.0)
            if self.training:
                bias = bias.masked_fill(drop, 0.0)
        if self.text_proj is not None:
            rows = rows + self.text_proj(self.text_vectors[uniq])
        return rows, bias

    DENSE_ROWS = 32
    """score_items with one list of C items per row: when the batch's lists hold at most DENSE_ROWS * C distinct
    items, score every row against all of them (one GEMM) and gather; else gather each row's item vectors. On CPU
    the gather's backward (a scatter-add of P * C rows) costs ~50-80x a GEMM multiply-add per score."""

    def score_items(self, user: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """next_item logits of the user vectors [P, d] at the items `ids`: [C] shared by every row -> [P, C]
        (user @ table[ids].T + bias[ids]), or [P, C] one list per row -> [P, C]. The same numbers as the columns
        `ids` of heads()' [P, N] logits (ID dropout included: a dropped item has neither ID nor bias)."""
        uniq, inv = torch.unique(ids, return_inverse=True)
        vec, bias = self._rows(uniq)
        if ids.ndim == 1:
            return user @ vec[inv].T + bias[inv]
        if len(uniq) <= self.DENSE_ROWS * ids.shape[-1]:
            return torch.gather(user @ vec.T + bias, 1, inv)
        return (vec[inv] @ user.unsqueeze(-1)).squeeze(-1) + bias[inv]

    def freeze_item_table(self) -> None:
        """Precompute the item table for inference/export (it does not depend on the request)."""
        with torch.no_grad():
            self._frozen_table = None
            self._frozen_table = self.item_table().detach().clone()

    def train(self, mode: bool = True):
        if mode:
            self._frozen_table = None
        self._id_drop = None
        return super().train(mode)

    def forget_ids(self, items: torch.Tensor) -> None:
        """Zero the ID embedding and bias of `items` (bool [N]): after ID-dropout training, an item with no
        training event is scored from its text vector alone, as the dropped items were in training."""
        with torch.no_grad():
            self.id_emb.weight[items] = 0.0
            self.item_bias[items] = 0.0
        self._frozen_table = None

    # ------------------------------------------------------------------ encoder
    def encode(self, items: torch.Tensor, ratings: torch.Tensor, length: torch.Tensor, table: torch.Tensor):
        """States [B, L+1, d]; index L-length is BOS, the last index is the state after the whole history."""
        return self.encode_vectors(table[items], ratings, length)

    def encode_vectors(self, vectors: torch.Tensor, ratings: torch.Tensor, length: torch.Tensor,
                       last_only: bool = False) -> torch.Tensor:
        """encode() from the history's item vectors [B, L, d] (rows of the item table) instead of ids: the user
        encoder of two-part serving, whose item table lives outside the graph (items can be added without a
        new export). last_only: only the state after the whole history, [B, d] (the final block runs one query).
        """
        b, L, _ = vectors.shape
        idx = torch.arange(L + 1, device=vectors.device).unsqueeze(0)  # [1, L+1]
        start = (L - length).unsqueeze(1)  # BOS slot, [B, 1]
        valid = idx >= start
        is_bos = idx == start
        item_x = vectors + self.rating_emb(torch.clamp(torch.round(ratings), 0, 5).long())
        item_x = torch.cat([torch.zeros_like(item_x[:, :1]), item_x], dim=1)  # slot 0 never holds an item
        x = torch.where(is_bos.unsqueeze(-1), self.bos.expand_as(item_x), item_x)
        pos = torch.clamp(idx - start, min=0)
        x = x + self.pos_emb(pos)
        causal = idx.transpose(0, 1) >= idx  # [L+1, L+1] query >= key
        allowed = (causal.unsqueeze(0) & valid.unsqueeze(1)) | torch.eye(L + 1, dtype=torch.bool, device=x.device)
        n = len(self.blocks)
        for i, blk in enumerate(self.blocks):
            x = blk(x, allowed, last_only=last_only and i == n - 1)
        x = self.ln_f(x)
        return x[:, -1] if last_only else x

    def user_side(self, z: torch.Tensor) -> dict[str, torch.Tensor]:
        """The user half of every head from the state z [..., d]: "next_item" (the user vector, scored against
        the item table), and for rating / like the tower's user features (PairTower.user), which
        PairTower.combine joins with the item table's tower features."""
        per_task = self.mtl(z)
        out = {"next_item": self.next_proj(per_task["next_item"])}
        if "rating" in self.tasks:
            out["rating"] = self.rating_tower.user(per_task["rating"])
        if "like" in self.tasks:
            out["like"] = self.like_tower.user(per_task["like"])
        return out

    def item_side(self, table: torch.Tensor) -> dict[str, torch.Tensor]:
        """The item half of the rating / like towers for item vectors [M, d]: {task: [M, tower_hidden]}."""
        out = {}
        if "rating" in self.tasks:
            out["rating"] = self.rating_tower.item(table)
        if "like" in self.tasks:
            out["like"] = self.like_tower.item(table)
        return out

    def cold_item_vectors(self, text_vectors: torch.Tensor) -> torch.Tensor:
        """Item vectors [M, d] of items the student never saw, from their (standardised) teacher text vectors:
        a zero ID embedding plus the text projection, the path forget_ids gives cold-start items."""
        if self.text_proj is None:
            raise ValueError("this student was trained without text vectors (student.use_text_vectors=false): "
                             "it has no text projection, so items it never saw cannot be added; retrain with "
                             "use_text_vectors=true")
        if text_vectors.ndim != 2 or text_vectors.shape[1] != self.text_proj.in_features:
            raise ValueError(f"text vectors must be [M, {self.text_proj.in_features}], got {tuple(text_vectors.shape)}")
        return self.text_proj(text_vectors.float())

    def heads(self, z: torch.Tensor, table: torch.Tensor, cand: torch.Tensor) -> dict[str, torch.Tensor]:
        """z [..., d] states; cand [..., C] item ids. Returns outputs keyed by task (+ user_vector)."""
        per_task = self.mtl(z)
        user = self.next_proj(per_task["next_item"])
        bias = self.item_bias
        if self.training and self._id_drop is not None:
            bias = bias.masked_fill(self._id_drop, 0.0)
        out = {"next_item": user @ table.T + bias, "user_vector": user}
        return self._pair_heads(per_task, table[cand], out)

    def _pair_heads(self, per_task: dict, cand_vec: torch.Tensor, out: dict) -> dict:
        """rating / like of the candidate vectors [..., C, d] into `out`."""
        if "rating" in self.tasks:
            out["rating"] = self.rating_tower(per_task["rating"], cand_vec) + self.rating_mean
        if "like" in self.tasks:
            out["like"] = self.like_tower(per_task["like"], cand_vec)
        return out

    def forward(self, history_items, history_ratings, history_length, candidates):
        """Serving: one user state per row; next_item scores over the catalog, rating/like per candidate."""
        table = self.item_table()
        states = self.encode(history_items, history_ratings, history_length, table)
        return self.heads(states[:, -1], table, candidates)

    def forward_positions(self, items, ratings, length, select: Optional[torch.Tensor] = None, catalog: bool = True):
        """Training: the state before each slot j predicts item j; rating/like are for item j itself.

        Returns per-position outputs [B, L, ...] (next_item [B, L, N], rating/like [B, L, 1]) plus
        "state" [B, L, d], the encoder state before item j (what representation alignment reads);
        positions j < L - length are padding. With `select` (bool [B, L]) only the selected positions
        are scored and every output is flat [P, ...] in row-major order of `select` (training scores
        only its labelled positions: the [*, N] catalog logits dominate the cost).

        catalog=False (student.next_item_loss=sampled): no "next_item" logits and no [N, d] item table;
        instead "user_vector" [.., d] and "score_items", this model's score_items(user, ids), with which the
        loss scores only its candidates (item rows, bias and ID dropout as in the catalog logits).
        """
        if not catalog:
            return self._positions_without_catalog(items, ratings, length, select)
        table = self.item_table()
        states = self.encode(items, ratings, length, table)[:, :-1]
        if select is not None:
            states, items = states[select], items[select]
        out = self.heads(states, table, items.unsqueeze(-1))
        out["state"] = states
        return out

    def _positions_without_catalog(self, items, ratings, length, select):
        """forward_positions(catalog=False): the history's item rows only (item_rows), one ID-dropout draw."""
        if self._frozen_table is None:
            self._draw_id_drop()
        states = self.encode_vectors(self.item_rows(items), ratings, length)[:, :-1]
        if select is not None:
            states, items = states[select], items[select]
        per_task = self.mtl(states)
        user = self.next_proj(per_task["next_item"])
        out = {"user_vector": user, "score_items": self.score_items, "state": states}
        return self._pair_heads(per_task, self.item_rows(items.unsqueeze(-1)), out)

    def param_counts(self) -> dict:
        """Trainable parameters, and the frozen buffers (the text-vector table) that ship with the model."""
        params = sum(p.numel() for p in self.parameters())
        buffers = sum(b.numel() for b in self.buffers())
        return dict(params=params, buffers=buffers, total=params + buffers)

    # ------------------------------------------------------------------ persistence
    def config_dict(self) -> dict:
        return dict(student=asdict(self.cfg), n_items=self.n_items, tasks=self.tasks,
                    text_dim=None if self.text_vectors is None else int(self.text_vectors.shape[1]))

    def save(self, folder: Path, extra: Optional[dict] = None) -> None:
        from safetensors.torch import save_file
        from .io import atomic_write_text, atomic_path
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in self.state_dict().items()}
        with atomic_path(folder / "model.safetensors") as tmp:
            save_file(state, str(tmp))
        atomic_write_text(folder / "config.json", json.dumps({**self.config_dict(), **(extra or {})}, indent=2))

    @classmethod
    def load(cls, folder: Path) -> "Student":
        from safetensors.torch import load_file
        folder = Path(folder)
        for f in ("config.json", "model.safetensors"):
            if not (folder / f).exists():
                raise FileNotFoundError(f"{folder / f} is missing; run the student stage first (`distillrec student <run>`)")
        meta = json.loads((folder / "config.json").read_text())
        state = load_file(str(folder / "model.safetensors"))
        text = state.get("text_vectors")
        from .config import ConfigError, build_config
        try:  # the config builder names an unknown or mistyped field (a raw TypeError would not)
            sc = build_config(StudentConfig, meta["student"], "student")
        except ConfigError as e:
            raise ValueError(f"{folder / 'config.json'} was written by another version of distillrec ({e}); "
                             "re-run the student stage (`distillrec student <run>`)") from None
        model = cls(sc, meta["n_items"], meta["tasks"], text_vectors=text)
        model.load_state_dict(state)
        return model.eval()
