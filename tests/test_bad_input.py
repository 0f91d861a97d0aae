"""Every bad input raises an error that names the argument and the bad value."""

import pytest
import torch

import fastprune as fp


def make(**kw):
    args = dict(num_samples=20, num_classes=5, epochs=3, device="cpu")
    args.update(kw)
    return fp.DynamicPruner(**args)


def batch(B=4, C=5):
    return torch.randn(B, C, requires_grad=True), torch.arange(B) % C, torch.arange(B)


@pytest.mark.parametrize("kw,match", [
    (dict(keep_ratio=0.0), r"keep_ratio must be a number in \(0.0, 1.0\], got 0.0"),
    (dict(keep_ratio=1.5), r"keep_ratio .* got 1.5"),
    (dict(keep_ratio=float("nan")), r"keep_ratio .* got nan"),
    (dict(keep_ratio="0.5"), r"keep_ratio .* got '0.5'"),
    (dict(ema=1.0), r"ema must be a number in \[0.0, 1.0\), got 1.0"),
    (dict(ema=-0.1), r"ema .* got -0.1"),
    (dict(epochs=0), r"epochs must be an integer >= 1, got 0"),
    (dict(epochs=2.5), r"epochs must be an integer >= 1, got 2.5"),
    (dict(num_samples=0), r"num_samples must be an integer >= 1, got 0"),
    (dict(num_classes=0), r"num_classes must be an integer in \[1, 262144\], got 0"),
    (dict(num_classes=300000), r"num_classes .* got 300000"),
    (dict(policy="greedy"), r"policy must be one of infobatch, topk, random, full; got 'greedy'"),
    (dict(warmup=-1), r"warmup must be an integer >= 0, got -1"),
    (dict(anneal=1.5), r"anneal .* got 1.5"),
    (dict(noise_ratio=1.0), r"noise_ratio .* got 1.0"),
    (dict(noise_ratio=0.1, noise_evidence="clip"), r"noise_evidence='clip' needs CLIP embeddings"),
    (dict(noise_evidence="both", text_emb=None), r"noise_evidence='both' needs CLIP embeddings"),
    (dict(noise_evidence="loss"), r"noise_evidence must be one of auto, model, clip, both; got 'loss'"),
    (dict(noise_start=0), r"noise_start must be an integer >= 1, got 0"),
    (dict(noise_relabel=True, noise_evidence="model"), r"noise_relabel=True needs both sources of evidence"),
    (dict(label_smoothing=1.0), r"label_smoothing .* got 1.0"),
    (dict(max_drop=1.0), r"max_drop .* got 1.0"),
    (dict(semantic_weight=-1.0), r"semantic_weight .* got -1.0"),
    (dict(validate="maybe"), r"validate must be one of async, sync, none; got 'maybe'"),
    pytest.param(dict(device="cuda"), r"device='cuda' but CUDA is not available here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available")),
])
def test_constructor_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


@pytest.mark.parametrize("kw,match", [
    (dict(image_emb=torch.randn(20, 8)), r"image_emb needs text_emb"),
    (dict(image_emb=torch.randn(20, 8), text_emb=torch.randn(5, 9)), r"image_emb width 8 differs from text_emb width 9"),
    (dict(image_emb=torch.randn(19, 8), text_emb=torch.randn(5, 8)), r"image_emb must have num_samples=20 rows, got 19"),
    (dict(text_emb=torch.randn(4, 8)), r"text_emb must have num_classes=5 rows, got 4"),
    (dict(text_emb=torch.randn(5)), r"text_emb must be a 2-D tensor"),
    (dict(text_emb=torch.randn(5, 8).double()), r"text_emb must be float16, bfloat16 or float32, got torch.float64"),
    (dict(text_emb=torch.randn(5, 8), device="meta"), r"text_emb is on cpu but the pruner's device is meta"),
])
def test_embedding_arguments(kw, match):
    with pytest.raises(ValueError, match=match):
        make(**kw)


def test_logits_not_2d():
    with pytest.raises(ValueError, match=r"logits must be a 2-D \(batch x classes\) tensor, got shape \(5,\)"):
        make().step(torch.randn(5), torch.arange(5), torch.arange(5))


def test_logits_wrong_width_dtype_and_empty():
    p = make()
    with pytest.raises(ValueError, match="logits has 6 columns but num_classes=5"):
        p.step(torch.randn(3, 6), torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match="logits must be float32, bfloat16 or float16, got torch.float64"):
        p.step(torch.randn(3, 5).double(), torch.arange(3), torch.arange(3))
    with pytest.raises(ValueError, match=r"logits has an empty batch"):
        p.step(torch.randn(0, 5), torch.arange(0), torch.arange(0))


@pytest.mark.parametrize("name", ["labels", "indices"])
def test_labels_and_indices_shape_dtype_device(name):
    p = make()
    logits, labels, indices = batch()
    args = {"labels": labels, "indices": indices}
    with pytest.raises(ValueError, match=rf"{name} must have shape \(4,\) to match logits, got \(3,\)"):
        p.step(logits, **{**args, name: args[name][:3]})
    with pytest.raises(ValueError, match=rf"{name} must have shape \(4,\) to match logits, got \(4, 1\)"):
        p.step(logits, **{**args, name: args[name][:, None]})
    with pytest.raises(ValueError, match=rf"{name} must be int64, got torch.int32"):
        p.step(logits, **{**args, name: args[name].int()})
    with pytest.raises(ValueError, match=rf"{name} is on meta but the pruner's device is cpu"):
        p.step(logits, **{**args, name: args[name].to("meta")})


def assert_refused(p, b, bad, row, exc, cases):
    """``p.step(*b)`` raises ``exc`` for each ``(value, match)`` of ``cases`` put at ``bad[row]`` (``bad``: a
    tensor of ``b``)."""
    for value, match in cases:
        bad[row] = value
        with pytest.raises(exc, match=match):
            p.step(*b)


def test_label_out_of_range(both_paths):
    p, b = make(), batch()
    labels = b[1]
    assert_refused(p, b, labels, 2, ValueError, [
        (5, r"labels: value 5 is outside \[0, 5\) and is not ignore_index=-100"),
        (-1, r"labels: value -1 is outside")])
    labels[2] = -100  # ignore_index is fine
    p.step(*b)


def test_index_out_of_range(both_paths):
    p, b = make(), batch()
    assert_refused(p, b, b[2], 1, IndexError, [
        (20, r"indices: value 20 is outside \[0, num_samples=20\)"),
        (-2, r"indices: value -2 is outside")])
    assert p.visits.sum() == 6  # good rows still counted, bad ones left out


def test_nonfinite_logits_warn_by_default_and_raise_in_sync_mode(both_paths):
    logits, labels, indices = batch()
    logits = logits.detach().clone()
    logits[3, 1] = float("nan")
    p = make()
    with pytest.warns(RuntimeWarning, match=r"logits: 1 rows had a non-finite loss .* batch row 3"):
        loss = p.step(logits, labels, indices)
    assert torch.isnan(loss)
    assert torch.isfinite(p.scores).all() and p.visits[3] == 0
    with pytest.warns(RuntimeWarning, match=r"logits: 1 rows had a non-finite loss"):  # only the new ones
        p.step(logits, labels, indices)
    strict = make(validate="sync")
    with pytest.raises(ValueError, match=r"logits: 1 rows had a non-finite loss"):
        strict.step(logits, labels, indices)


def test_duplicate_indices_warn_once(kernel_path):
    p = make()
    logits, labels, _ = batch()
    with pytest.warns(RuntimeWarning, match=r"indices: sample 1 appeared twice in one batch"):
        p.step(logits, labels, torch.tensor([1, 1, 2, 3]))
    assert p.visits[1] == 1


def test_per_batch_embedding_errors():
    table = make(image_emb=torch.randn(20, 8), text_emb=torch.randn(5, 8))
    logits, labels, indices = batch()
    with pytest.raises(ValueError, match="image_emb: this pruner already has a fixed image-embedding table"):
        table.step(logits, labels, indices, image_emb=torch.randn(4, 8))
    with pytest.raises(ValueError, match="image_emb: per-batch embeddings need text_emb"):
        make().step(logits, labels, indices, image_emb=torch.randn(4, 8))
    online = make(text_emb=torch.randn(5, 8))
    with pytest.raises(ValueError, match=r"image_emb must have shape \(4, 8\), got \(3, 8\)"):
        online.step(logits, labels, indices, image_emb=torch.randn(3, 8))
    with pytest.raises(ValueError, match="image_emb width 7 differs from text_emb width 8"):
        online.step(logits, labels, indices, image_emb=torch.randn(4, 7))
    with pytest.raises(ValueError, match="image_emb is on meta"):
        online.step(logits, labels, indices, image_emb=torch.randn(4, 8, device="meta"))


def test_load_state_dict_from_another_size():
    sd = make(num_samples=30).state_dict()
    with pytest.raises(ValueError, match=r"state_dict is for num_samples=30, but this pruner has num_samples=20"):
        make().load_state_dict(sd)
    sd = make(num_classes=6).state_dict()
    with pytest.raises(ValueError, match=r"state_dict is for num_classes=6, but this pruner has num_classes=5"):
        make().load_state_dict(sd)


def test_steps_per_epoch_batch_size():
    with pytest.raises(ValueError, match="batch_size must be an integer >= 1, got 0"):
        make().steps_per_epoch(0)


def test_end_of_run_plots_survive_non_finite_values(tmp_path):
    from fastprune.report import plot_run

    p = make(text_emb=torch.randn(5, 8))
    p.step(*batch())
    p.scores[:2] = float("nan")  # whatever went wrong in a run, its outputs are still written
    p.consistency[:4] = float("inf")
    paths = plot_run([{"epoch": 0, "kept_fraction": 1.0, "val_top1": None, "suspected_noisy": 0}], p, tmp_path)
    assert [x.name for x in paths] == ["kept_and_accuracy.png", "score_consistency_hist.png", "suspected_noisy.png"]
