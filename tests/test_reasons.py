"""Recommendation reasons (distill/reasons.py): batched shared-prefix greedy decoding equals a plain per-item loop,
stopping rules, the prompt's shared prefix, and which history titles a reason names. Tiny random Llama, float32."""
import copy

import pytest
import torch

from distill.config import TeacherConfig
from distill.reasons import (ReasonConfig, build_prompt, continuation_text, display_title, encode_prompt, forced_start,
                             generate_reasons, named_history, normalise_title, stop_token_ids)
from distill.teacher import load_causal_lm

HISTORY = ["Toy Story (1995)", "Godfather, The (1972)", "Fargo (1996)", "Star Wars (1977)", "Heat (1995)"]
ITEMS = ["Up (2009)", "Return of the Jedi (1983)", "Ghost and the Darkness, The (1996)"]  # suffixes of 3 lengths
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def tiny():
    """Initialised 10x wider than Llama's default (0.02) so attention is sharp and RoPE positions change the
    argmax: with near-uniform attention a wrong position id would go unnoticed."""
    tc = TeacherConfig(model="tiny-random")
    lm, tok = load_causal_lm(TeacherConfig(model="tiny-random", tiny={**tc.tiny, "initializer_range": 0.2}), seed=0)
    return lm, tok


def plain_greedy(lm, tok, ids: list[int], max_new: int) -> list[int]:
    """Reference: the full forward of prefix + suffix + generated so far, argmax of the last position, no cache."""
    stops, out = stop_token_ids(tok), []
    with torch.inference_mode():
        for _ in range(max_new):
            t = int(lm(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(t)
            if t in stops or "\n" in tok.decode([t]):
                break
    return out


# ----------------------------------------------------------------------------- model + prompt
def test_load_causal_lm_tiny_is_a_seeded_full_lm(tiny):
    lm, tok = tiny
    assert lm.config.num_hidden_layers == TeacherConfig().tiny["num_hidden_layers"]
    assert lm.lm_head.weight.shape == (259, TeacherConfig().tiny["hidden_size"]) and not lm.training
    assert tok("A", add_special_tokens=False)["input_ids"] == [ord("A") + 3]  # ByteTokenizer ids
    again, _ = load_causal_lm(TeacherConfig(model="tiny-random"), seed=0)
    same, _ = load_causal_lm(TeacherConfig(model="tiny-random"), seed=0)
    other, _ = load_causal_lm(TeacherConfig(model="tiny-random"), seed=1)
    assert torch.equal(again.lm_head.weight, same.lm_head.weight)
    assert not torch.equal(other.lm_head.weight, again.lm_head.weight)
    assert lm.lm_head.weight.std() > 5 * again.lm_head.weight.std()  # the fixture's wider init took effect


def test_plain_prompt_prefix_is_shared_and_suffix_ends_with_forced_start(tiny):
    _, tok = tiny
    (p1, s1), (p2, s2) = (build_prompt(tok, HISTORY, t) for t in ITEMS[:2])
    assert p1 == p2 == ("Movies I watched, oldest first:\n- Toy Story (1995)\n- The Godfather (1972)\n"
                        "- Fargo (1996)\n- Star Wars (1977)\n- Heat (1995)\n")
    assert s1 == 'Recommended: Up (2009)\nReason: We recommend Up (2009) because you liked "'
    assert s2.endswith(forced_start(ITEMS[1])) and s1 != s2
    prefix_ids, suffix_ids = encode_prompt(tok, p1, s1)
    assert prefix_ids == [b + 3 for b in p1.encode()]  # the byte tokenizer adds no BOS
    assert suffix_ids == [b + 3 for b in s1.encode()]


def test_chat_template_prompt_puts_the_forced_start_in_the_assistant_turn(tiny):
    _, tok = tiny
    tok = copy.deepcopy(tok)  # a private copy keeps the module fixture template-free
    tok.chat_template = CHATML
    (p1, s1), (p2, s2) = (build_prompt(tok, HISTORY, t) for t in ITEMS[:2])
    assert p1 == p2 and p1.startswith("<|im_start|>system\n") and p1.endswith("- Heat (1995)\n")
    assert "<|im_start|>user\nMovies I watched, oldest first:\n- Toy Story (1995)\n" in p1
    assert "Up (2009)" not in p1
    assert s1.endswith('<|im_end|>\n<|im_start|>assistant\nWe recommend Up (2009) because you liked "')
    assert s1.startswith('\nWhy would I like "Up (2009)"?')


@pytest.mark.parametrize("title,shown", [("Godfather, The (1972)", "The Godfather (1972)"),
                                         ("Grand Day Out, A (1992)", "A Grand Day Out (1992)"),
                                         ("Sex, Lies, and Videotape (1989)", "Sex, Lies, and Videotape (1989)"),
                                         ("Ref, The", "The Ref"), ("Up (2009)", "Up (2009)")])
def test_display_title_moves_the_catalog_article_to_the_front(title, shown):
    assert display_title(title) == shown


def test_forced_start_uses_the_display_title():
    assert forced_start("Ghost and the Darkness, The (1996)") == \
        'We recommend The Ghost and the Darkness (1996) because you liked "'


def test_build_prompt_needs_a_history(tiny):
    with pytest.raises(ValueError, match="at least one history title"):
        build_prompt(tiny[1], [], "Up (2009)")


@pytest.mark.parametrize("field", ["history_items", "max_new_tokens", "batch_size"])
@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_reason_config_rejects_non_positive_ints(field, bad):
    with pytest.raises(ValueError, match=f"ReasonConfig.{field} must be a positive integer"):
        ReasonConfig(**{field: bad})


# ----------------------------------------------------------------------------- generation
def test_batched_shared_prefix_equals_plain_loop_per_item(tiny):
    lm, tok = tiny
    cfg = ReasonConfig(naming="free", max_new_tokens=10, batch_size=8)
    reasons = generate_reasons(lm, tok, HISTORY, ITEMS, cfg)
    assert len({r.n_suffix_tokens for r in reasons}) == 3  # padding really happens
    for r, item in zip(reasons, ITEMS):
        prefix_ids, suffix_ids = encode_prompt(tok, *build_prompt(tok, HISTORY, item))
        assert (r.n_prefix_tokens, r.n_suffix_tokens) == (len(prefix_ids), len(suffix_ids))
        assert r.token_ids == plain_greedy(lm, tok, prefix_ids + suffix_ids, 10)
        assert r.sentence == forced_start(item) + r.text and r.item_title == item
        assert r.n_generated == len(r.token_ids) and r.call_seconds > 0


@pytest.mark.parametrize("batch_size", [1, 2])
def test_batch_size_does_not_change_the_tokens(tiny, batch_size):
    lm, tok = tiny
    full = generate_reasons(lm, tok, HISTORY, ITEMS, ReasonConfig(naming="free", max_new_tokens=10, batch_size=8))
    split = generate_reasons(lm, tok, HISTORY, ITEMS,
                             ReasonConfig(naming="free", max_new_tokens=10, batch_size=batch_size))
    assert [r.token_ids for r in split] == [r.token_ids for r in full]


def test_only_the_last_history_items_form_the_prefix(tiny):
    lm, tok = tiny
    long = [f"Movie {i} (19{i:02d})" for i in range(30)]
    r = generate_reasons(lm, tok, long, ITEMS[:1], ReasonConfig(history_items=4, max_new_tokens=2))[0]
    prefix, _ = build_prompt(tok, long[-4:], ITEMS[0])
    assert r.n_prefix_tokens == len(prefix.encode())


def test_generation_stops_at_max_new_tokens(tiny):
    lm, tok = tiny
    reasons = generate_reasons(lm, tok, HISTORY, ITEMS, ReasonConfig(naming="free", max_new_tokens=3))
    for r in reasons:
        assert len(r.token_ids) <= 3
        assert (r.stop == "max_new_tokens") == (len(r.token_ids) == 3 and r.token_ids[-1] not in stop_token_ids(tok))
    assert any(r.stop == "max_new_tokens" for r in reasons)


class ForceTokenInRow(torch.nn.Module):
    """LM head wrapper: on its `at`-th call row `row` gets a huge logit for `token`. Call 0 is the prefix forward,
    call k (k >= 1) gives the k-th generated token."""

    def __init__(self, head, row: int, at: int, token: int):
        super().__init__()
        self.head, self.row, self.at, self.token, self.calls = head, row, at, token, 0

    def forward(self, h):
        logits = self.head(h)
        if self.calls == self.at:
            logits[self.row, :, self.token] = 1e4
        self.calls += 1
        return logits


@pytest.mark.parametrize("token,why", [(2, "eos"), (ord("\n") + 3, "newline")])
def test_a_stopped_row_ends_while_the_others_continue_unchanged(tiny, token, why):
    lm, tok = tiny
    cfg = ReasonConfig(naming="free", max_new_tokens=8)
    free = generate_reasons(lm, tok, HISTORY, ITEMS, cfg)
    assert all(r.stop == "max_new_tokens" for r in free)  # the seeded tiny model never stops by itself here
    head = lm.lm_head
    lm.lm_head = ForceTokenInRow(head, row=1, at=3, token=token)
    try:
        forced = generate_reasons(lm, tok, HISTORY, ITEMS, cfg)
    finally:
        lm.lm_head = head
    assert forced[1].token_ids == free[1].token_ids[:2] + [token] and forced[1].stop == why
    assert forced[1].text == continuation_text(tok, free[1].token_ids[:2], set())
    for r, f in zip((forced[0], forced[2]), (free[0], free[2])):  # pad with mask 0 changed nothing for them
        assert r.token_ids == f.token_ids and len(r.token_ids) == 8


def test_continuation_text_drops_stop_tokens_and_cuts_at_newline(tiny):
    _, tok = tiny
    ids = tok("Fargo (1996)\" is great\nmore", add_special_tokens=False)["input_ids"]
    assert continuation_text(tok, ids, {2}) == 'Fargo (1996)" is great'
    assert continuation_text(tok, tok("Heat", add_special_tokens=False)["input_ids"] + [2], {2}) == "Heat"


def test_no_items_no_work(tiny):
    assert generate_reasons(*tiny, HISTORY, [], ReasonConfig()) == []


# ----------------------------------------------------------------------------- named_history
@pytest.mark.parametrize("title,norm", [("Godfather, The (1972)", "godfather"), ("The Godfather", "godfather"),
                                        ("Star Wars (1977)", "star wars"), ("Big Night (1996)", "big night"),
                                        ("Cité des enfants perdus, La (1995)", "cite des enfants perdus la"),
                                        ("Mr. Holland's Opus (1995)", "mr holland s opus"),
                                        ("A Little Princess (1995)", "little princess")])
def test_normalise_title(title, norm):
    assert normalise_title(title) == norm


def test_named_history_matches_articles_years_case_and_punctuation():
    history = ["Godfather, The (1972)", "Star Wars (1977)", "Fargo (1996)", "Mr. Holland's Opus (1995)"]
    text = 'We recommend X because you liked "THE GODFATHER" and mr holland’s opus; not fargo-like at all'
    assert named_history(text, history) == [0, 3, 2]  # first named first
    assert named_history("You liked Star Wars (1977).", history) == [1]
    assert named_history("You liked Casablanca.", history) == []


def test_named_history_longest_overlapping_title_wins():
    history = ["Star Wars (1977)", "Star Wars: Episode V (1980)", "Alien (1979)"]
    assert named_history("you liked Star Wars: Episode V so much", history) == [1]
    assert named_history("you liked Star Wars and Star Wars: Episode V", history) == [0, 1]
    assert named_history("you liked Aliens", history) == []  # whole words only


def test_named_history_ignores_titles_too_short_to_be_specific():
    assert named_history("it is a film about it", ["It (1990)", "Up (2009)"]) == []


# ----------------------------------------------------------------------------- naming a history title (trie)
def plain_constrained(lm, tok, ids: list[int], titles: list[str], max_new: int) -> tuple[list[int], int]:
    """Reference for naming='greedy': no cache; while a title is open, the argmax over the tokens that continue
    some title's '<display title>"' token sequence; then plain_greedy for max_new free tokens."""
    seqs = [tok(display_title(t) + '"', add_special_tokens=False)["input_ids"] for t in titles]
    out: list[int] = []
    with torch.inference_mode():
        while True:
            logits = lm(input_ids=torch.tensor([ids + out])).logits[0, -1]
            live = [s for s in seqs if s[:len(out)] == out and len(s) > len(out)]
            allowed = sorted({s[len(out)] for s in live})
            out.append(max(allowed, key=lambda a: (float(logits[a]), -allowed.index(a))))
            done = [i for i, s in enumerate(seqs) if s == out]
            if done:
                return out + plain_greedy(lm, tok, ids + out, max_new), done[0]


def test_name_history_decodes_one_whole_history_title_then_goes_on_freely(tiny):
    lm, tok = tiny
    cfg = ReasonConfig(naming="greedy", max_new_tokens=5, batch_size=2)
    reasons = generate_reasons(lm, tok, HISTORY, ITEMS, cfg)
    for r, item in zip(reasons, ITEMS):
        prefix_ids, suffix_ids = encode_prompt(tok, *build_prompt(tok, HISTORY, item))
        ids, named = plain_constrained(lm, tok, prefix_ids + suffix_ids, HISTORY, 5)
        assert r.named == named and 0 <= named < len(HISTORY)
        assert r.token_ids == ids
        title = display_title(HISTORY[named]) + '"'
        assert r.text.startswith(title)  # the byte tokenizer decodes the title exactly
        assert named in named_history(r.text, HISTORY)
    free = generate_reasons(lm, tok, HISTORY, ITEMS, ReasonConfig(naming="free", max_new_tokens=30))
    assert all(r.named == -1 for r in free)
    assert [r.token_ids for r in free] != [r.token_ids for r in reasons]  # the trie did steer the tokens


def test_naming_must_be_a_known_rule():
    with pytest.raises(ValueError, match="naming"):
        ReasonConfig(naming="best")


def _sequence_logprob(lm, ids: list[int], tail: list[int]) -> float:
    """log p(tail | ids) from one plain forward, no cache."""
    with torch.inference_mode():
        logp = torch.log_softmax(lm(input_ids=torch.tensor([ids + tail])).logits[0].float(), -1)
    return sum(float(logp[len(ids) + j - 1, t]) for j, t in enumerate(tail))


def test_calibrated_naming_picks_the_title_with_the_best_likelihood_ratio_then_goes_on_freely(tiny):
    from distill.reasons import NULL_ITEM, title_ids
    lm, tok = tiny
    cfg = ReasonConfig(naming="calibrated", max_new_tokens=6, batch_size=2)
    reasons = generate_reasons(lm, tok, HISTORY, ITEMS, cfg)
    seqs = title_ids(tok, HISTORY)
    null = sum(encode_prompt(tok, *build_prompt(tok, HISTORY, NULL_ITEM)), [])
    prior = [_sequence_logprob(lm, null, t) for t in seqs]
    for r, item in zip(reasons, ITEMS):
        ids = sum(encode_prompt(tok, *build_prompt(tok, HISTORY, item)), [])
        ratio = [_sequence_logprob(lm, ids, t) - p for t, p in zip(seqs, prior)]
        best = max(range(len(seqs)), key=lambda i: ratio[i])
        assert r.named == best
        assert r.token_ids == seqs[best] + plain_greedy(lm, tok, ids + seqs[best], 6)
        assert r.text.startswith(display_title(HISTORY[best]) + '"')
    assert ReasonConfig().naming == "greedy"  # the default: it agrees more, at less than half the cost (docs)
