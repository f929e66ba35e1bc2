"""Shared check of the cost model's claim, for both teacher inputs (text and soft item tokens)."""
import torch


def assert_one_pass_equals_prefixes(teacher, builder, items, ratings) -> torch.Tensor:
    """The states read before item j / at item j in ONE pass over the whole history equal those of a separate
    prompt holding only that prefix (causal attention). Returns the one-pass hidden states [T, H]."""
    full = builder.encode(items, ratings)
    with torch.no_grad():
        h = teacher.hidden(torch.tensor([full.ids]), torch.ones(1, len(full.ids), dtype=torch.long))[0]
        for j in range(1, len(items)):
            prefix = builder.encode(items[: j + 1], ratings[: j + 1], open_last=True)
            hp = teacher.hidden(torch.tensor([prefix.ids]), torch.ones(1, len(prefix.ids), dtype=torch.long))[0]
            torch.testing.assert_close(h[full.before[j]], hp[prefix.before[-1]], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(h[full.item_end[j]], hp[prefix.item_end[-1]], atol=1e-5, rtol=1e-5)
    return h
