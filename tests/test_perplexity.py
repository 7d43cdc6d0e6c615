"""core/perplexity.py against a hand computation in float64 on a tiny bigram 'model'."""

import math
from types import SimpleNamespace

import torch
from torch import nn

from lotaqaf_cli.core.perplexity import perplexity


class Bigram(nn.Module):
    """logits of the next token depend only on the current token: a [V, V] table."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = nn.Parameter(table)

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids])


def test_perplexity_equals_float64_hand_computation():
    g = torch.Generator().manual_seed(0)
    vocab, n, seq = 7, 5, 6
    table = torch.randn(vocab, vocab, generator=g) * 2
    windows = torch.randint(0, vocab, (n, seq), generator=g)
    rows = table.double().tolist()
    nll, count = 0.0, 0
    for w in windows.tolist():
        for t in range(seq - 1):
            logits = rows[w[t]]
            log_z = math.log(sum(math.exp(v) for v in logits))
            nll += log_z - logits[w[t + 1]]
            count += 1
    want = math.exp(nll / count)
    for batch_size in (1, 2, 5):  # uneven last batch included
        got, n_tok = perplexity(Bigram(table), windows, batch_size=batch_size)
        assert n_tok == count == n * (seq - 1)
        assert math.isclose(got, want, rel_tol=1e-5)
