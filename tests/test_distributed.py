"""Multi-process behaviour on CPU (gloo): ActNorm's data-dependent init agrees across ranks, evaluation shards
cover every example once and their metrics reduce to the exact mean over uneven ranks, and a 2-process DDP run
through train.py validates and tests to the same metrics as one process on its checkpoint."""

import json
import os
import socket

import forked
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT

from flowforge.data.sampler import EvalSampler
from flowforge.errors import ConfigError
from flowforge.flows.actnorm import ActNorm
from flowforge.training.module import ExampleMeans


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _actnorm_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(rank)  # every rank sees different data
    x = torch.randn(256, 3, 4, 4) * (1 + rank) + 3 * rank
    an = ActNorm((3, 4, 4))
    an(x)
    params = torch.cat([an.loc.detach().flatten(), an.log_scale.detach().flatten()])
    gathered = [torch.zeros_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    if rank == 0:
        torch.save(torch.stack(gathered), out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_actnorm_init_is_identical_on_every_rank(tmp_path):
    out = tmp_path / "params.pt"
    mp.spawn(_actnorm_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    per_rank = torch.load(out)
    torch.testing.assert_close(per_rank[0], per_rank[1], atol=0, rtol=0)
    # and it is the statistics of the union of both ranks' data, not rank 0's alone
    torch.manual_seed(0)
    x0 = torch.randn(256, 3, 4, 4)
    torch.manual_seed(1)
    x1 = torch.randn(256, 3, 4, 4) * 2 + 3
    union_mean = torch.cat([x0, x1]).mean((0, 2, 3))
    torch.testing.assert_close(per_rank[0][:3], -union_mean, atol=1e-5, rtol=0)


def test_eval_sampler_shards_cover_every_example_once():
    shards = [list(EvalSampler(7, 2, rank)) for rank in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    assert [len(EvalSampler(7, 2, rank)) for rank in range(2)] == [4, 3]
    assert sorted(shards[0] + shards[1]) == list(range(7))  # no padding, no repeats
    with pytest.raises(ConfigError, match="fewer than the 3 DDP processes"):
        EvalSampler(2, 3, 0, what="the test split")
    # whole batches of the split are dealt out: rank r's i-th batch is the split's batch i * R + r
    batched = [EvalSampler(7, 2, rank, batch_size=2) for rank in range(2)]
    assert [list(s) for s in batched] == [[0, 1, 4, 5], [2, 3, 6]]
    assert [len(s) for s in batched] == [4, 3]
    # fewer batches than ranks: the batch size is lowered so that every rank gets one
    small = [EvalSampler(5, 4, rank, batch_size=100) for rank in range(4)]
    assert small[0].batch_size == 1 and sorted(i for s in small for i in s) == list(range(5))
    assert all(len(s) > 0 for s in small)


# per-example values of each rank, in batches of unequal number and size (rank 0: 3 batches, rank 1: 1)
_UNEVEN = {0: [(0, 4), (4, 4), (8, 1)], 1: [(9, 2)]}


def _uneven_values(start, size):
    x = torch.linspace(-3, 5, 11, dtype=torch.float64)[start : start + size].float() ** 2
    return {"loss": x, "acc": (x > 2).float(), "scalar": x.double().mean()}


def _means_worker(rank, world, port, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    means = ExampleMeans()
    for start, size in _UNEVEN[rank]:
        means.add(_uneven_values(start, size), size)

    def reduce(t):
        dist.all_reduce(t)
        return t

    result = torch.stack([v for _, v in sorted(means.compute(reduce).items())])
    gathered = [torch.zeros_like(result) for _ in range(world)]
    dist.all_gather(gathered, result)
    if rank == 0:
        torch.save(torch.stack(gathered), out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_example_means_reduce_to_the_pooled_mean_over_uneven_ranks(tmp_path):
    out = tmp_path / "means.pt"
    mp.spawn(_means_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    per_rank = torch.load(out)
    batches = [_uneven_values(start, size) for rank in (0, 1) for start, size in _UNEVEN[rank]]
    pooled = {k: torch.cat([b[k].double().reshape(-1) for b in batches]).mean() for k in ("acc", "loss")}
    # a scalar value is its batch's mean: weighted by the batch size, it pools to the same example mean
    expected = torch.stack([pooled["acc"], pooled["loss"], pooled["loss"]])
    for rank in (0, 1):  # every rank gets the same exact value
        torch.testing.assert_close(per_rank[rank], expected, atol=1e-12, rtol=0)
    # the mean of the two ranks' means (which over-weights rank 1's two examples) is far off
    loss = [torch.cat([_uneven_values(s, n)["loss"].double() for s, n in _UNEVEN[r]]).mean() for r in (0, 1)]
    assert abs(float(sum(loss) / 2 - pooled["loss"])) > 1


def _train_ddp(run_dir, *overrides):
    """train.py with 2 CPU processes (``trainer=ddp_sim``); returns the process and the run's metrics.json."""
    cmd = [
        "train.py",
        "trainer=ddp_sim",
        *overrides,
        "callbacks.sample_figures.every_n_epochs=100",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        f"hydra.run.dir={run_dir}",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    proc = forked.run(cmd, cwd=ROOT, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_ddp_two_processes_match_single_process_validation_and_test(tmp_path):
    """The val and test splits (1001 examples, eval batches of 250) split over 2 ranks as 501 + 500 examples in 3
    and 2 batches: Lightning's DistributedSampler would repeat one example (and warn), a mean of the ranks' means
    would over-weight rank 1; both metrics must equal one process's over the same weights."""
    run_dir = tmp_path / "ddp"
    proc, ddp_metrics = _train_ddp(
        run_dir,
        "model=glow",
        "model.num_steps=2",
        "model.hidden=[16]",
        "dataset.n_train=1000",
        "dataset.n_val=1001",
        "dataset.n_test=1001",
        "dataset.batch_size=250",
        "dataset.eval_batch_size=250",
        "trainer.max_epochs=2",
    )
    assert "replicates" not in proc.stdout + proc.stderr  # Lightning's padding DistributedSampler is not used
    assert "sync_dist=True" not in proc.stdout + proc.stderr  # every epoch-level metric is reduced over ranks
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    # the same weights validated and tested by one process
    import pytorch_lightning as pl
    from omegaconf import OmegaConf

    from flowforge import experiment

    run_cfg, state = experiment.load_checkpoint(str(ckpt))
    datamodule, module = experiment.build(run_cfg)
    module.load_state_dict(state["state_dict"])
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(
        module, datamodule=datamodule, verbose=False
    )[0]
    tested = experiment.evaluate(OmegaConf.create({"ckpt_path": str(ckpt)}))
    keys = ["val/loss", "val/nll", "test/loss", "test/nll"]
    one = {**single, **tested}
    diffs = {k: abs(one[k] - ddp_metrics[k]) for k in keys}
    # absolute tolerance 1e-6 on values of about 1-3 nats: the per-example values agree to float32 rounding
    # (batches of 250 on each rank against batches of 250 in one process), and the means are taken in float64
    assert max(diffs.values()) < 1e-6, (diffs, {k: (one[k], ddp_metrics[k]) for k in keys})


@pytest.mark.slow
def test_ddp_image_test_bits_per_dim_equal_one_process_under_dequantisation_noise(tmp_path):
    """Image bits/dim are stochastic (uniform dequantisation noise): under DDP each example must draw the noise one
    process draws for it, so a 2-process test gives the same bits/dim as eval.py on the final checkpoint (which
    replays the run's test streams).  Digits' test split in eval batches of 50 gives the ranks uneven batch counts."""
    run_dir = tmp_path / "ddp"
    _, ddp_metrics = _train_ddp(
        run_dir,
        "model=glow",
        "dataset=digits",
        "model.num_steps=1",
        "dataset.eval_batch_size=50",
        "trainer.max_steps=3",
        "+trainer.limit_val_batches=1",
    )
    from omegaconf import OmegaConf

    from flowforge import experiment

    one = experiment.evaluate(OmegaConf.create({"ckpt_path": str(run_dir / "checkpoints" / "last.ckpt")}))
    diffs = {k: abs(one[k] - ddp_metrics[k]) for k in ("test/bpd", "test/nll")}
    # a different noise draw moves test/bpd by about 1e-3 here; the same draws agree to float32 rounding
    assert max(diffs.values()) < 1e-6, (diffs, one, ddp_metrics)
