"""The per-sample evidence of wrong labels: the model's area under the margin, its prediction, CLIP's margin."""

import math

import pytest
import torch

import fastprune as fp
from fastprune import evidence as ev


def brute_margin(sims, labels):
    margins, preferred = [], []
    for row, y in zip(sims.tolist(), labels.tolist()):
        others = [v for c, v in enumerate(row) if c != y]
        margins.append(row[y] - max(others) if others else math.inf)
        preferred.append(row.index(max(row)))  # the first maximal class
    return margins, preferred


@pytest.mark.parametrize("C", [1, 2, 7])
def test_margins_and_preferred_match_brute_force(C):
    g = torch.Generator().manual_seed(C)
    sims = torch.randint(-3, 4, (50, C), generator=g).float()  # small integers: many ties
    labels = torch.randint(0, C, (50,), generator=g)
    margin, preferred = ev.margins_and_preferred(sims, labels)
    want_m, want_p = brute_margin(sims, labels)
    assert margin.tolist() == want_m
    assert preferred.tolist() == want_p and preferred.dtype == torch.int32


def test_model_margin_is_the_mean_over_scored_visits():
    N, C = 6, 4
    pruner = fp.DynamicPruner(N, C, epochs=3, device="cpu")
    batches = [
        (torch.tensor([[3.0, 1.0, 0.0, 0.0], [0.0, 2.0, 5.0, 0.0], [1.0, 1.0, 1.0, 9.0]]),
         torch.tensor([0, 1, -100]), torch.tensor([0, 1, 2])),  # the ignored row scores nothing
        (torch.tensor([[1.0, 2.0, 0.0, 0.0], [float("nan"), 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 1.0]]),
         torch.tensor([0, 1, 2]), torch.tensor([0, 1, 4])),  # the non-finite row scores nothing
    ]
    pruner.step(*batches[0])
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        pruner.step(*batches[1])
    assert pruner.model_margin[0].item() == pytest.approx((2.0 - 1.0) / 2)  # +2, then -1
    assert pruner.model_margin[1].item() == pytest.approx(-3.0)  # only its first visit counts
    assert pruner.model_margin[4].item() == pytest.approx(3.0)
    assert torch.isnan(pruner.model_margin[[2, 3, 5]]).all()
    assert pruner.model_pred.tolist() == [1, 2, -1, -1, 2, -1]
    assert pruner.given_labels.tolist() == [0, 1, -1, -1, 2, -1]


def test_duplicates_in_a_batch_count_their_first_row_like_the_score(both_paths):
    pruner = fp.DynamicPruner(3, 3, epochs=2, device="cpu")
    logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    with pytest.warns(RuntimeWarning):
        pruner.step(logits, torch.tensor([0, 1]), torch.tensor([1, 1]))
    assert pruner.model_margin[1].item() == 2.0 and pruner.visits[1].item() == 1
    assert pruner.model_pred[1].item() == 0 and pruner.given_labels[1].item() == 0


def unit(x):
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("chunk", [1 << 24, 5])  # one chunk; many chunks of a few rows
def test_clip_margin_of_a_table_is_computed_once_per_scored_sample(monkeypatch, chunk):
    monkeypatch.setattr(ev, "CLIP_CHUNK_ELEMENTS", chunk)
    N, C, D = 9, 3, 5
    g = torch.Generator().manual_seed(0)
    image, text = torch.randn(N, D, generator=g), torch.randn(C, D, generator=g)
    labels = torch.randint(0, C, (N,), generator=g)
    pruner = fp.DynamicPruner(N, C, epochs=2, image_emb=image, text_emb=text, device="cpu")
    seen = torch.tensor([0, 2, 3, 7, 8])
    pruner.step(torch.randn(5, C, generator=g), labels[seen], seen)
    want_m, want_p = brute_margin(unit(image[seen]) @ unit(text).T, labels[seen])
    torch.testing.assert_close(pruner.clip_margin[seen], torch.tensor(want_m), rtol=1e-6, atol=1e-6)
    assert pruner.clip_pred[seen].tolist() == want_p
    rest = torch.tensor([1, 4, 5, 6])
    assert torch.isnan(pruner.clip_margin[rest]).all() and (pruner.clip_pred[rest] == -1).all()
    before = pruner.clip_margin.clone()
    pruner.step(torch.randn(4, C, generator=g), labels[rest], rest)  # the rest, later: computed then
    assert torch.equal(pruner.clip_margin[seen], before[seen])
    want_m, _ = brute_margin(unit(image[rest]) @ unit(text).T, labels[rest])
    torch.testing.assert_close(pruner.clip_margin[rest], torch.tensor(want_m), rtol=1e-6, atol=1e-6)


def test_clip_margin_with_per_batch_embeddings_keeps_the_latest_view():
    N, C, D = 4, 3, 6
    g = torch.Generator().manual_seed(1)
    text = torch.randn(C, D, generator=g)
    pruner = fp.DynamicPruner(N, C, epochs=2, text_emb=text, device="cpu")
    idx, labels = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    for _ in range(2):
        img = torch.randn(3, D, generator=g)
        pruner.step(torch.randn(3, C, generator=g), labels, idx, image_emb=img)
    want_m, want_p = brute_margin(unit(img) @ unit(text).T, labels)
    torch.testing.assert_close(pruner.clip_margin[idx], torch.tensor(want_m), rtol=1e-6, atol=1e-6)
    assert pruner.clip_pred.tolist() == [*want_p, -1]
    assert math.isnan(pruner.clip_margin[3].item())


def test_evidence_survives_a_state_dict_and_older_states_start_it_empty():
    N, C = 8, 3
    g = torch.Generator().manual_seed(2)
    a = fp.DynamicPruner(N, C, epochs=3, device="cpu")
    idx = torch.arange(N)
    a.step(torch.randn(N, C, generator=g), torch.randint(0, C, (N,), generator=g), idx)
    sd = a.state_dict()
    assert sd["version"] == 5
    names = ("model_margin", "model_pred", "given_labels", "scores", "visits")
    for version in (5, 4):  # 4: the same format (only later epochs' shuffle differs)
        b = fp.DynamicPruner(N, C, epochs=3, device="cpu")
        b.load_state_dict({**sd, "version": version})
        for name in names:
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(b.epoch_indices, a.epoch_indices)
    model = ("margin_sum", "margin_count", "pred", "label")  # version 3 kept them beside CLIP's columns
    v3 = {k: v for k, v in sd.items() if k not in model + ("clip",)} | {"version": 3, "evidence": {
        **{k: sd[k] for k in model}, **sd["clip"]}}
    c = fp.DynamicPruner(N, C, epochs=3, device="cpu")
    c.load_state_dict(v3)
    for name in names:
        assert torch.equal(getattr(a, name), getattr(c, name)), name
    v2 = {k: v for k, v in v3.items() if k != "evidence"} | {"version": 2}
    b.load_state_dict(v2)
    assert torch.isnan(b.model_margin).all() and (b.model_pred == -1).all() and (b.given_labels == -1).all()
    assert torch.equal(a.scores, b.scores)
