"""Sampling: temperature, top-k, top-p, min-p, the repetition penalty, seeds; and the thread the server loads in."""

import pytest
import torch

from tightfit.runtime import SamplingParams
from tightfit.runtime.sampling import SamplingError, filter_logits, sample


def test_top_p_from_the_largest_candidates_keeps_what_a_full_sort_keeps():
    """The nucleus found among the top TOP_P_CANDIDATES equals the full sort's; rows whose nucleus is wider
    (flat logits) take the full sort."""
    from tightfit.runtime import sampling

    def full_sort(x, top_p):
        sx, order = torch.sort(x, descending=True)
        probs = torch.softmax(sx, -1)
        drop = probs.cumsum(-1) - probs >= top_p
        return x.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))

    g = torch.Generator().manual_seed(0)
    for scale in (0.1, 4.0, 12.0):  # nucleus wider than the candidates, within them, a few tokens
        x = torch.randn(3, 20000, generator=g) * scale
        for top_p in (0.3, 0.9, 0.99):
            kept = sampling._top_p(x, top_p)
            assert torch.equal(torch.isinf(kept), torch.isinf(full_sort(x, top_p)))
            assert torch.equal(kept[~torch.isinf(kept)], x[~torch.isinf(kept)])


def test_sampling_functions():
    logits = torch.tensor([1.0, 3.0, 2.0, -1.0])
    assert sample(logits, SamplingParams()) == 1
    assert sample(logits, SamplingParams(temperature=1.0, top_k=1)) == 1
    assert sample(logits, SamplingParams(temperature=1.0, top_p=0.01)) == 1
    kept = filter_logits(logits, SamplingParams(temperature=1.0, top_k=2))
    assert torch.isinf(kept).tolist() == [True, False, False, True]
    kept = filter_logits(logits, SamplingParams(temperature=1.0, min_p=0.3))  # p(2)/p(1) = e^-1 = 0.37 stays
    assert torch.isinf(kept).tolist() == [True, False, False, True]
    draws = lambda s: [sample(logits, SamplingParams(temperature=1.0, seed=s), torch.Generator().manual_seed(s))
                       for _ in range(1)]
    assert draws(3) == draws(3)
    counts = torch.bincount(torch.tensor([sample(logits, SamplingParams(temperature=1.0), g)
                                          for g in [torch.Generator().manual_seed(i) for i in range(400)]]), minlength=4)
    p = torch.softmax(logits, -1)
    assert abs(counts[1] / 400 - p[1]) < 0.08 and counts[3] < 20
    # a repetition penalty pushes a seen token below the next one
    assert sample(logits, SamplingParams(repetition_penalty=2.0), seen=torch.tensor([1])) == 2
    with pytest.raises(SamplingError, match="top_p must be in"):
        SamplingParams(top_p=0)


def test_off_main_thread_returns_the_result_and_raises_the_error_of_a_thread_that_exits():
    """The server loads its model in a thread that exits (runtime.batch.off_main_thread), so that no OpenMP
    team stays in the main thread beside the batch thread's."""
    import threading

    from tightfit.errors import NotAModelError
    from tightfit.runtime.batch import off_main_thread

    seen = []
    assert off_main_thread(lambda x: seen.append(threading.current_thread()) or x * 2, 21) == 42
    assert seen[0] is not threading.main_thread() and not seen[0].is_alive()

    def bad():
        raise NotAModelError("not a model: give a .gguf file")
    with pytest.raises(NotAModelError, match="give a .gguf file"):
        off_main_thread(bad)
