"""Multi-process behaviour on CPU (gloo): ActNorm's data-dependent init agrees across ranks, and a
2-process DDP run through train.py validates to the same metric as one process on its checkpoint."""

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT

from flowforge.flows.actnorm import ActNorm


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


@pytest.mark.slow
def test_ddp_two_processes_match_single_process_validation(tmp_path):
    run_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        "train.py",
        "trainer=ddp_sim",
        "model=glow",
        "model.num_steps=2",
        "model.hidden=[16]",
        "dataset.n_train=2000",
        "dataset.n_val=1000",
        "dataset.n_test=1000",
        "dataset.batch_size=250",
        "dataset.eval_batch_size=500",
        "trainer.max_epochs=2",
        "callbacks.sample_figures.every_n_epochs=100",
        "trainer.enable_progress_bar=false",
        "~callbacks.progress_bar",
        f"hydra.run.dir={run_dir}",
    ]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp_metrics = json.loads((run_dir / "metrics.json").read_text())
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    # the same weights validated by one process
    import pytorch_lightning as pl

    from flowforge import experiment

    run_cfg, state = experiment.load_checkpoint(str(ckpt))
    datamodule, module = experiment.build(run_cfg)
    module.load_state_dict(state["state_dict"])
    single = pl.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False).validate(
        module, datamodule=datamodule, verbose=False
    )[0]
    # tolerance: float32 summation order differs between 2x1 and 1x2 batches
    assert abs(single["val/loss"] - ddp_metrics["val/loss"]) < 1e-4
