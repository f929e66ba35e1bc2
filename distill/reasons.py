"""Short recommendation reasons written by the teacher LLM: bounded greedy generation, batched over a user's
candidates with ONE forward over their shared history prefix.

Layout of one user's call (`generate_reasons`):
    prefix  = the history titles (oldest first)                         one forward, batch 1, KV cache kept
    suffix  = the recommended item + a forced assistant start           one forward per batch of candidates
              'We recommend {item} because you liked "'                 (the prefix cache repeated per row)
    decode  = greedy, one token per step, until EOS / chat end / newline or max_new_tokens
The forced start makes the continuation name a history title, which `named_history` finds in the text.
Prefix and suffix are tokenized separately and their ids concatenated, so the prefix ids are the same for every
item by construction and the batched result equals generating each (prefix + suffix) alone.
"""
from __future__ import annotations

import copy
import inspect
import re
import time
import unicodedata
from dataclasses import dataclass

import torch

from .teacher import pad_id

SYSTEM = "You are a movie recommender. You explain each recommendation in one short sentence."
"""System turn of a chat-template prompt: asks for the one-sentence form the forced start begins."""
HISTORY_HEAD = "Movies I watched, oldest first:\n"
"""First line of the history block (the shared prefix)."""
NAMINGS = ("free", "greedy", "calibrated")
NULL_ITEM = "N/A"
"""The content-free item of contextual calibration: its prompt measures the LLM's preference among the history
titles that does not depend on the recommended item."""
CHAT_END = "<|im_end|>"
"""End-of-turn token of ChatML templates (SmolLM2, Qwen): a stop token when the tokenizer has it."""


# ----------------------------------------------------------------------------- config and result
@dataclass
class ReasonConfig:
    history_items: int = 20
    """Most recent history titles shown in the prompt. 20 keeps the SmolLM2 prompt ~250 tokens, so a user's 3
    reasons cost about a second on 2 CPU cores; older titles rarely get named anyway."""
    max_new_tokens: int = 24
    """Tokens generated at most per reason after the named history title (with naming 'free': in all; the title
    itself is bounded by the longest shown title). 24 tokens is a short clause; a bound keeps the cost per reason
    fixed."""
    batch_size: int = 8
    """Candidates decoded together over one copy of the shared prefix cache. 8 covers a typical top-k of
    reasons in one batch; larger batches only grow the (repeated) cache."""
    naming: str = "greedy"
    """How the reason's first quoted title is chosen, after 'because you liked "':
    'free': plain greedy decoding (SmolLM2-135M mostly repeats the recommended item: 9 of 9 reasons of 3 ML-100K
      users named no history title, which leaves nothing to compare with the student's explanation);
    'greedy' (default): greedy under a trie of the shown history titles, so every reason names one history item;
    'calibrated': the history title t maximising log p(t | item) - log p(t | 'N/A') (contextual calibration,
      Zhao et al. 2021): the trie choice without the LLM's item-independent preference, 2.3x the cost.
    Measured on 100 ML-100K test users x 3 items (docs/interactive.md): 'greedy' names one of the student's 3
    supporting items in 21.3% of reasons and 'calibrated' in 17.0%, against 15.0% for 3 random history items;
    0.83 vs 1.92 s per reason. SmolLM2-135M's item-independent preference (the same title for all 3 items of a
    user 43% of the time; recent items) is what agrees with the student; without it little is left.
    The rest of the reason is free greedy decoding either way."""

    def __post_init__(self):
        if self.naming not in NAMINGS:
            raise ValueError(f"ReasonConfig.naming must be one of {NAMINGS} (got {self.naming!r})")
        for name in ("history_items", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReasonConfig.{name} must be a positive integer (got {value!r})")


@dataclass
class Reason:
    item_title: str
    """The recommended item the reason is about."""
    text: str
    """The generated continuation, without the forced start, cut at the first newline, stop tokens dropped."""
    sentence: str
    """The whole reason: forced start + text."""
    token_ids: list[int]
    """Generated ids, including the stop token when one ended the row."""
    stop: str
    """Why the row ended: 'eos' (EOS or chat end token), 'newline' or 'max_new_tokens'."""
    n_prefix_tokens: int
    """Tokens of the shared prefix (the same for every reason of a call)."""
    n_suffix_tokens: int
    """Tokens of this item's suffix (item + forced start)."""
    call_seconds: float
    """Wall time of the whole `generate_reasons` call (prefix + all batches); the same on every reason of it."""
    named: int = -1
    """With naming 'greedy' / 'calibrated': index (in the shown history) of the title the reason names; -1 otherwise."""

    @property
    def n_generated(self) -> int:
        return len(self.token_ids)


# ----------------------------------------------------------------------------- prompt
def display_title(title: str) -> str:
    """A title as people write it: ML-100K's 'Godfather, The (1972)' -> 'The Godfather (1972)'. The catalog form
    made SmolLM2-135M copy 'The (1997)' fragments instead of titles: 0 of 6 reasons named a history title
    with the catalog form, 3 of 6 with this one (2 ML-100K users x 3 candidates, greedy)."""
    year = _YEAR.search(title)
    body = title[:year.start()] if year else title
    article = _TRAILING_ARTICLE.search(body)
    if article:
        body = f"{body[article.start():].lstrip(', ').strip()} {body[:article.start()]}"
    return body + (title[year.start():] if year else "")


def forced_start(item_title: str) -> str:
    """The assistant's first words, fixed, so that greedy continuation names a history title."""
    return f'We recommend {display_title(item_title)} because you liked "'


def history_block(history_titles: list[str]) -> str:
    """The titles oldest first, one per line ('- Toy Story (1995)'), in `display_title` form."""
    return HISTORY_HEAD + "".join(f"- {display_title(t)}\n" for t in history_titles)


def _request(item_title: str) -> str:
    return (f'\nWhy would I like "{display_title(item_title)}"? '
            "Answer with one sentence that names a movie from my list.")


def build_prompt(tok, history_titles: list[str], item_title: str) -> tuple[str, str]:
    """(shared prefix text, per-item suffix text). The prefix holds the history and depends on nothing else; the
    suffix names the item and ends with `forced_start(item_title)` inside the assistant turn. With a chat
    template (SmolLM2-Instruct: ChatML) the turns are rendered by it; without one (the byte tokenizer) a plain
    'Recommended: ... / Reason: ...' layout is used."""
    if not history_titles:
        raise ValueError("build_prompt needs at least one history title (the reason names one of them)")
    history = history_block(history_titles)
    if getattr(tok, "chat_template", None):
        marker = "\x00ITEM\x00"  # the item's part of the user turn: everything the template adds after it is suffix
        messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": history + marker}]
        full = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if full.count(marker) != 1:
            raise ValueError("the tokenizer's chat template does not render the user message verbatim; "
                             "cannot split it into a shared prefix and a per-item suffix")
        prefix, rest = full.split(marker)
        return prefix, _request(item_title) + rest + forced_start(item_title)
    return history, f"Recommended: {display_title(item_title)}\nReason: {forced_start(item_title)}"


def _adds_bos(tok) -> bool:
    """Whether the tokenizer puts BOS in front of a text it encodes for its model (Llama-2 style does, ChatML
    tokenizers do not)."""
    bos = getattr(tok, "bos_token_id", None)
    if bos is None:
        return False
    ids = tok("a", add_special_tokens=True)["input_ids"]
    return len(ids) > 0 and ids[0] == bos


def encode_prompt(tok, prefix: str, suffix: str) -> tuple[list[int], list[int]]:
    """(prefix ids, suffix ids), each text tokenized on its own; BOS leads the prefix when the tokenizer adds one
    for its model and the text does not already start with it (a template may write it)."""
    prefix_ids = list(tok(prefix, add_special_tokens=False)["input_ids"])
    if _adds_bos(tok) and not prefix.startswith(tok.bos_token):
        prefix_ids = [tok.bos_token_id] + prefix_ids
    return prefix_ids, list(tok(suffix, add_special_tokens=False)["input_ids"])


# ----------------------------------------------------------------------------- stopping
def stop_token_ids(tok) -> set[int]:
    """EOS and, when the tokenizer has it, the chat end token ('<|im_end|>')."""
    ids = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    end = tok.convert_tokens_to_ids(CHAT_END) if CHAT_END in tok.get_vocab() else None
    return ids | ({end} if end is not None else set())


def _has_newline(tok, token_id: int, memo: dict) -> bool:
    if token_id not in memo:
        memo[token_id] = "\n" in tok.decode([token_id])
    return memo[token_id]


def continuation_text(tok, ids: list[int], stops: set[int]) -> str:
    """The text of generated ids: stop tokens dropped, cut at the first newline."""
    text = tok.decode([i for i in ids if i not in stops], skip_special_tokens=False)
    return text.split("\n", 1)[0]


# ----------------------------------------------------------------------------- generation
def _cache_kw(lm) -> str:
    """The forward's KV-cache argument: 'cache' in transformers >= 5.x, 'past_key_values' before."""
    return "cache" if "cache" in inspect.signature(lm.forward).parameters else "past_key_values"


def _out_cache(out):
    return out.cache if getattr(out, "cache", None) is not None else out.past_key_values


def prefix_cache(lm, prefix_ids: list[int]):
    """The KV cache of the shared prefix (batch 1), one forward."""
    kw = _cache_kw(lm)
    ids = torch.tensor([prefix_ids], device=lm.device)
    out = lm(input_ids=ids, use_cache=True, logits_to_keep=1, **{kw: None})
    return _out_cache(out)


def _suffix_inputs(suffixes: list[list[int]], n_prefix: int, pad: int):
    """Left-padded suffix ids [B, L], the attention mask over prefix + suffix [B, P + L] and the position ids
    [B, L]: each row's real tokens sit at positions P .. P + len - 1, so padding changes nothing."""
    width = max(len(s) for s in suffixes)
    ids = torch.full((len(suffixes), width), pad, dtype=torch.long)
    mask = torch.zeros(len(suffixes), n_prefix + width, dtype=torch.long)
    mask[:, :n_prefix] = 1
    pos = torch.full((len(suffixes), width), n_prefix, dtype=torch.long)
    for r, s in enumerate(suffixes):
        ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
        mask[r, n_prefix + width - len(s):] = 1
        pos[r, width - len(s):] = torch.arange(n_prefix, n_prefix + len(s))
    return ids, mask, pos


_END = -1
"""Trie key marking that a title's tokens end at this node (its value: the title's index)."""


def title_trie(tok, titles: list[str]) -> dict:
    """Nested {token id: node} over each title's tokens as the prompt shows it (`display_title` + closing quote),
    tokenized on its own like the suffix. A node's _END entry holds the index of the title ending there."""
    root: dict = {}
    for i, seq in enumerate(title_ids(tok, titles)):
        node = root
        for token in seq:
            node = node.setdefault(int(token), {})
        node.setdefault(_END, i)  # two titles with the same display form: the first one names it
    return root


def _constrained(logits: torch.Tensor, node: dict) -> int:
    """The most likely next token among the trie node's children."""
    allowed = [t for t in node if t != _END]
    return allowed[int(torch.argmax(logits[allowed]))]


def greedy_batch(lm, tok, cache, n_prefix: int, suffixes: list[list[int]], max_new_tokens: int,
                 trie: dict | None = None):
    """Greedy continuation of each suffix after the cached prefix. `cache` must already hold len(suffixes) rows
    (it is extended in place). Returns per row (generated ids, stop reason, named index). A finished row keeps
    feeding pad with mask 0, so it changes nothing for the others. With `trie` (title_trie), each row first decodes
    one whole title of the trie, choosing among the allowed tokens greedily, and then goes on freely; the named
    index per row is that title's (-1 without a trie). max_new_tokens bounds the free tokens after the title (the
    title is at most the trie's depth), as in 'calibrated' naming where the title is part of the input."""
    kw, pad, stops, memo = _cache_kw(lm), pad_id(tok), stop_token_ids(tok), {}
    nodes = [trie if trie else None for _ in suffixes]
    named = [-1] * len(suffixes)
    ids, mask, pos = _suffix_inputs(suffixes, n_prefix, pad)
    dev = lm.device
    mask, nxt_pos = mask.to(dev), pos[:, -1].to(dev) + 1
    logits = lm(input_ids=ids.to(dev), attention_mask=mask, position_ids=pos.to(dev), use_cache=True,
                logits_to_keep=1, **{kw: cache}).logits
    out: list[list[int]] = [[] for _ in suffixes]
    free = [0] * len(suffixes)
    why = ["max_new_tokens"] * len(suffixes)
    alive = torch.ones(len(suffixes), dtype=torch.bool, device=dev)
    while True:
        token = logits[:, -1].argmax(-1)
        for r in alive.nonzero().flatten().tolist():
            t = int(token[r])
            if nodes[r] is not None:  # inside the title: only its tokens, no stop rule, not counted
                t = _constrained(logits[r, -1], nodes[r])
                token[r] = t
                nodes[r] = nodes[r][t]
                if all(k == _END for k in nodes[r]):  # the title is complete: decode freely from here
                    named[r], nodes[r] = nodes[r][_END], None
                out[r].append(t)
                continue
            out[r].append(t)
            free[r] += 1
            if t in stops or _has_newline(tok, t, memo):
                why[r] = "eos" if t in stops else "newline"
                alive[r] = False
            elif free[r] >= max_new_tokens:
                alive[r] = False
        if not alive.any():
            break
        feed = torch.where(alive, token, torch.full_like(token, pad))
        mask = torch.cat([mask, alive.long().unsqueeze(1)], dim=1)
        logits = lm(input_ids=feed.unsqueeze(1), attention_mask=mask, position_ids=nxt_pos.unsqueeze(1),
                    use_cache=True, logits_to_keep=1, **{kw: cache}).logits
        nxt_pos = nxt_pos + 1
    return out, why, named


def title_ids(tok, titles: list[str]) -> list[list[int]]:
    """Each title's tokens as a reason quotes it: display_title + closing quote, tokenized on its own."""
    return [list(tok(display_title(t) + '"', add_special_tokens=False)["input_ids"]) for t in titles]


def title_logprobs(lm, base, n_prefix: int, suffix: list[int], titles: list[list[int]]) -> torch.Tensor:
    """log p(title | prefix + suffix) [T] for each token sequence of `titles` (teacher forcing): the suffix is
    read once on a copy of the prefix cache, which is then repeated per title; titles are right-padded, so the
    padding (after every real token) changes nothing."""
    kw = _cache_kw(lm)
    cache = copy.deepcopy(base)
    dev = lm.device
    out = lm(input_ids=torch.tensor([suffix], device=dev), use_cache=True, logits_to_keep=1,
             position_ids=torch.arange(n_prefix, n_prefix + len(suffix), device=dev)[None], **{kw: cache})
    first = torch.log_softmax(out.logits[0, -1].float(), -1)
    cache = _out_cache(out)
    cache.batch_repeat_interleave(len(titles))
    width = max(len(t) for t in titles)
    ids = torch.zeros(len(titles), width, dtype=torch.long)
    mask = torch.zeros(len(titles), n_prefix + len(suffix) + width, dtype=torch.long)
    mask[:, :n_prefix + len(suffix)] = 1
    for r, t in enumerate(titles):
        ids[r, :len(t)] = torch.tensor(t)
        mask[r, n_prefix + len(suffix):n_prefix + len(suffix) + len(t)] = 1
    start = n_prefix + len(suffix)
    pos = torch.arange(start, start + width, device=dev)[None].expand(len(titles), -1)
    logits = lm(input_ids=ids.to(dev), attention_mask=mask.to(dev), position_ids=pos, use_cache=True,
                **{kw: cache}).logits
    logp = torch.log_softmax(logits.float(), -1)
    total = torch.zeros(len(titles))
    for r, t in enumerate(titles):
        total[r] = first[t[0]] + sum(float(logp[r, j - 1, t[j]]) for j in range(1, len(t)))
    return total


def calibrated_choice(lm, base, n_prefix: int, suffixes: list[list[int]], null_suffix: list[int],
                      titles: list[list[int]]) -> list[int]:
    """Per suffix, the index of the title maximising log p(title | suffix) - log p(title | null suffix)."""
    prior = title_logprobs(lm, base, n_prefix, null_suffix, titles)
    return [int(torch.argmax(title_logprobs(lm, base, n_prefix, s, titles) - prior)) for s in suffixes]


def _batches(n: int, size: int):
    return [list(range(i, min(i + size, n))) for i in range(0, n, size)]


def generate_reasons(lm, tok, history_titles: list[str], item_titles: list[str],
                     cfg: ReasonConfig | None = None) -> list[Reason]:
    """One reason per item title, in order: the last cfg.history_items titles form the shared prefix (one
    forward), each batch of cfg.batch_size items reuses its cache (repeated per row) and decodes greedily.
    Check a reason with `named_history(reason.text, history_titles)`: the forced start names the item itself."""
    from tqdm.auto import tqdm
    cfg = cfg or ReasonConfig()
    if not item_titles:
        return []
    history = list(history_titles)[-cfg.history_items:]
    start = time.perf_counter()
    texts = [build_prompt(tok, history, t) for t in item_titles]
    encoded = [encode_prompt(tok, p, s) for p, s in texts]
    prefix_ids = encoded[0][0]
    suffixes = [s for _, s in encoded]
    gen: list = [None] * len(item_titles)
    trie = title_trie(tok, history) if cfg.naming == "greedy" else None
    with torch.inference_mode():
        base = prefix_cache(lm, prefix_ids)
        forced: list[list[int]] = [[] for _ in item_titles]
        chosen = [-1] * len(item_titles)
        if cfg.naming == "calibrated":
            seqs = title_ids(tok, history)
            null_suffix = encode_prompt(tok, *build_prompt(tok, history, NULL_ITEM))[1]
            chosen = calibrated_choice(lm, base, len(prefix_ids), suffixes, null_suffix, seqs)
            forced = [seqs[c] for c in chosen]
            suffixes = [s + f for s, f in zip(suffixes, forced)]
        for batch in tqdm(_batches(len(item_titles), cfg.batch_size), desc="reasons", leave=False):
            cache = copy.deepcopy(base)
            cache.batch_repeat_interleave(len(batch))
            rows = greedy_batch(lm, tok, cache, len(prefix_ids), [suffixes[i] for i in batch], cfg.max_new_tokens,
                                trie=trie)
            for i, ids, why, named in zip(batch, *rows):
                gen[i] = (forced[i] + ids, why, chosen[i] if cfg.naming == "calibrated" else named)
    seconds = time.perf_counter() - start
    stops = stop_token_ids(tok)
    reasons = []
    for title, suffix, forced_ids, (ids, why, named) in zip(item_titles, suffixes, forced, gen):
        text = continuation_text(tok, ids, stops)
        reasons.append(Reason(item_title=title, text=text, sentence=forced_start(title) + text, token_ids=ids,
                              stop=why, n_prefix_tokens=len(prefix_ids), n_suffix_tokens=len(suffix) - len(forced_ids),
                              call_seconds=seconds, named=named))
    return reasons


# ----------------------------------------------------------------------------- which history titles a reason names
ARTICLES = ("the", "a", "an")
"""English articles: ML-100K writes 'Godfather, The (1972)'; a reason writes 'The Godfather'."""
MIN_TITLE_CHARS = 3
"""Shorter normalised titles ('M', 'Go') would match ordinary words."""
_YEAR = re.compile(r"\s*\(\d{4}\)\s*$")
_TRAILING_ARTICLE = re.compile(r",\s*(the|a|an)\s*$", re.IGNORECASE)


def _words(text: str) -> str:
    """Lowercase, accents stripped, punctuation and whitespace collapsed to single spaces."""
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c)).lower()
    return " ".join(re.sub(r"[\W_]+", " ", text).split())


def normalise_title(title: str) -> str:
    """'Godfather, The (1972)' -> 'godfather': year dropped, trailing or leading English article dropped,
    lowercase, punctuation collapsed."""
    title = _TRAILING_ARTICLE.sub("", _YEAR.sub("", title))
    words = _words(title).split()
    if len(words) > 1 and words[0] in ARTICLES:
        words = words[1:]
    return " ".join(words)


def _spans(needle: str, hay: str) -> list[tuple[int, int]]:
    """Whole-word occurrences of needle in hay (both normalised)."""
    return [(m.start(), m.end()) for m in re.finditer(rf"(?<!\S){re.escape(needle)}(?!\S)", hay)]


def named_history(reason_text: str, history_titles: list[str]) -> list[int]:
    """Indices of the history titles the reason names, first named first. A title is named when its normalised
    form (>= MIN_TITLE_CHARS characters) occurs as whole words in the normalised text; where matches overlap,
    the longest wins ('Star Wars: Episode V' over 'Star Wars'). Titles with the same normalised form are all
    returned (ordered by index)."""
    hay = _words(reason_text)
    found = []  # (start, end, index)
    for i, title in enumerate(history_titles):
        norm = normalise_title(title)
        if len(norm) >= MIN_TITLE_CHARS:
            found.extend((s, e, i) for s, e in _spans(norm, hay))
    taken: list[tuple[int, int]] = []
    first: dict[int, int] = {}
    for s, e, i in sorted(found, key=lambda m: (m[0] - m[1], m[0], m[2])):  # longest first
        if any(s < te and ts < e for ts, te in taken if (ts, te) != (s, e)):
            continue
        taken.append((s, e))
        first[i] = min(first.get(i, s), s)
    return sorted(first, key=lambda i: (first[i], i))
