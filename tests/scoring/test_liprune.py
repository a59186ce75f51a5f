"""LiPrune over fixed batches: scores equal each batch's Hessian spectral norm, determinism, the kept
fraction, and the paper's linear result (LiPrune's test loss below random pruning's early on)."""
import pytest
import torch
from torch import nn

from bench.repro.liprune import RATIOS, linear_experiment
from kdfast.errors import InvalidArgumentError
from kdfast.hessian import spectral_norms
from kdfast.scoring.liprune import fixed_batches, keep_top_batches, liprune_batch_scores, liprune_batches


def _data(n=23):
    x = torch.randn(n, 5) * 2
    y = torch.randint(0, 3, (n,))
    return [(x[i], int(y[i])) for i in range(n)]


def _model():
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3))


def test_scores_are_each_batch_spectral_norm():
    data, model = _data(), _model()
    scores, batch_ids = liprune_batch_scores(model, data, 5, seed=4, progress=False)
    assert scores.dtype == torch.float32 and batch_ids.dtype == torch.int64 and scores.shape == (23,)
    batches = fixed_batches(23, 5, seed=4)
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3]
    pairs = [(torch.stack([data[i][0] for i in b]), torch.tensor([data[i][1] for i in b])) for b in batches]
    want = spectral_norms(model.eval(), pairs, seed=4)
    for j, b in enumerate(batches):
        assert (batch_ids[b] == j).all()
        assert torch.equal(scores[b], want[j].expand(len(b)))


def test_batch_scores_are_deterministic_and_depend_on_the_seed():
    data, model = _data(), _model()
    first = liprune_batch_scores(model, data, 4, seed=1, progress=False)
    again = liprune_batch_scores(model, data, 4, seed=1, progress=False)
    other = liprune_batch_scores(model, data, 4, seed=2, progress=False)
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize("fraction", [0.2, 0.5, 1.0])
def test_liprune_batches_keeps_whole_top_batches(fraction):
    data, model = _data(40), _model().train()
    kept = liprune_batches(model, data, 8, fraction, seed=0, progress=False)
    assert model.training, "the model's mode must be restored"
    scores, batch_ids = liprune_batch_scores(model, data, 8, seed=0, progress=False)
    num_kept_batches = max(1, round(fraction * 5))
    per_batch = torch.stack([scores[batch_ids == j][0] for j in range(5)])
    threshold = per_batch.sort(descending=True).values[num_kept_batches - 1]
    assert kept.dtype == torch.int64 and torch.equal(kept, kept.sort().values)
    assert len(kept) == 8 * num_kept_batches
    assert (scores[kept] >= threshold).all() and (batch_ids[kept].unique().numel() == num_kept_batches)


def test_keep_top_batches_breaks_ties_by_batch_id_and_checks_fraction():
    scores = torch.tensor([2.0, 2.0, 2.0, 1.0, 2.0, 1.0])
    batch_ids = torch.tensor([1, 0, 1, 2, 0, 2])
    assert keep_top_batches(scores, batch_ids, 1 / 3).tolist() == [1, 4]  # batches 0 and 1 tie: 0 wins
    assert keep_top_batches(scores, batch_ids, 0.7).tolist() == [0, 1, 2, 4]  # round(2.1) = 2 batches
    assert keep_top_batches(scores, batch_ids, 0.01).tolist() == [1, 4]  # at least one batch
    for bad in (0, 1.5, -0.1):
        with pytest.raises(InvalidArgumentError, match="fraction"):
            keep_top_batches(scores, batch_ids, bad)


def test_batchnorm_model_is_scored_in_eval_mode():
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).train()
    scores, _ = liprune_batch_scores(model, _data(12), 6, progress=False)
    assert torch.isfinite(scores).all() and model.training


def test_paper_linear_result_liprune_beats_random_early():
    # Sec. 4.1 / Fig. 1: over the first iterations, LiPrune's mean test loss (100 runs) is below random
    # pruning's, with the 95% intervals apart, for every compression ratio.
    for ratio in RATIOS:
        curves = linear_experiment(ratio, runs=100, iters=10)
        lip, rnd = curves["liprune"][:, 1:], curves["random"][:, 1:]
        half = lambda c: 1.96 * c.std(dim=0) / c.shape[0] ** 0.5  # noqa: E731
        assert (lip.mean(dim=0) + half(lip) < rnd.mean(dim=0) - half(rnd)).all(), f"r = {ratio}"


def test_cli_liprune_on_a_jpeg_folder_loaded_with_decode(tmp_path, capsys):
    """`kdfast-score --method liprune` on an image folder: the batched decoder's (bytes, label, index) items
    reach the Hessian norms through the folder's batch pipeline, and agree with the PIL path."""
    import numpy as np
    from PIL import Image

    from kdfast.cli.main import score_main
    from kdfast.models import create_model
    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (tmp_path / "imgs" / c).mkdir(parents=True)
        for i in range(6):  # smooth content, so JPEG keeps it close to what was drawn
            base = np.kron(rng.integers(0, 256, (5, 7, 3)), np.ones((8, 8, 1))).astype(np.uint8)
            Image.fromarray(base).save(tmp_path / "imgs" / c / f"img{i}.JPEG", quality=95)
    torch.manual_seed(0)
    torch.save({"model": create_model("resnet8", num_classes=2, in_channels=3).state_dict()}, tmp_path / "m.pt")
    runs = {}
    for decode in ("cpu", "pil"):
        out = tmp_path / decode
        code = score_main(["--dataset", "folder", "--data-root", str(tmp_path / "imgs"), "--model", "resnet8",
                           "--checkpoint", str(tmp_path / "m.pt"), "--image-size", "16", "--decode", decode,
                           "--method", "liprune", "--batch-size", "4", "--out", str(out), "--quiet"])
        assert code == 0, capsys.readouterr().err
        runs[decode] = np.load(out / "scores.npy"), np.load(out / "batch_ids.npy")
    scores, batch_ids = runs["cpu"]
    assert scores.shape == (12,) and np.isfinite(scores).all() and (scores > 0).all()
    np.testing.assert_array_equal(batch_ids, runs["pil"][1])
    assert len(np.unique(scores)) == 3  # one norm per fixed batch
    # the decoders differ by at most one 8-bit level per pixel; the norms follow within a few percent
    np.testing.assert_allclose(scores, runs["pil"][0], rtol=5e-2)
