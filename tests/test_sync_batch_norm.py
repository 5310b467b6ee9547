"""fastreg.SyncBatchNorm across two gloo processes on the CPU: the same results as batch norm on
the whole batch in one process, with the ranks holding batches of different sizes."""

from __future__ import annotations

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import fastreg

WORLD = 2
SIZES = (3, 5)  # samples per rank: the merge must weight the ranks by their counts
CHANNELS = 4


def whole_batch(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(SIZES), CHANNELS, 5, 6, generator=g, dtype=torch.float64) * 3 + 7
    dy = torch.randn(x.shape, generator=g, dtype=torch.float64)
    return x.to(dtype), dy.to(dtype)


def rank_slice(rank: int) -> slice:
    start = sum(SIZES[:rank])
    return slice(start, start + SIZES[rank])


def _worker(rank: int, store_path: str, out_dir: str, channels_last: bool) -> None:
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        bn = fastreg.SyncBatchNorm(CHANNELS)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(0.5, 2.0, CHANNELS))
            bn.bias.copy_(torch.linspace(-1.0, 1.0, CHANNELS))
        x, dy = whole_batch()
        x, dy = x[rank_slice(rank)].clone(), dy[rank_slice(rank)]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x.requires_grad_()
        y = bn(x)
        y.backward(dy)
        torch.save(
            {
                "y": y.detach(),
                "grad_x": x.grad,
                "grad_w": bn.weight.grad,
                "grad_b": bn.bias.grad,
                "running_mean": bn.running_mean,
                "running_var": bn.running_var,
                "strides_match": y.stride() == x.stride(),
            },
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
        # y's autograd node holds the process group (as torch's SyncBatchNorm's does): freed
        # after the group's destruction, on torch 2.6 its gloo threads wait for the GIL that the
        # freeing thread holds, and the worker never exits. Free it while the group is alive.
        del y
    finally:
        dist.destroy_process_group()


def run_workers(worker, args, timeout_s: float = 180.0) -> None:
    """mp.spawn with a deadline: a worker stuck in a collective or at process-group teardown
    (torch 2.5/2.6 gloo did that once in a while) fails the test instead of hanging the suite."""
    context = mp.spawn(worker, args=args, nprocs=WORLD, join=False)
    deadline = time.monotonic() + timeout_s
    while not context.join(timeout=1.0):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            pytest.fail(f"the {WORLD} SyncBatchNorm workers did not finish within {timeout_s:.0f} s")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
@pytest.mark.parametrize("channels_last", [False, True])
def test_two_processes_match_the_whole_batch(tmp_path, channels_last):
    run_workers(_worker, (str(tmp_path / "store"), str(tmp_path), channels_last))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]

    x, dy = whole_batch()
    x.requires_grad_()
    weight = torch.linspace(0.5, 2.0, CHANNELS).requires_grad_()
    bias = torch.linspace(-1.0, 1.0, CHANNELS).requires_grad_()
    running_mean, running_var = torch.zeros(CHANNELS), torch.ones(CHANNELS)
    y = F.batch_norm(x, running_mean, running_var, weight, bias, True, 0.1, 1e-5)
    grad_x, grad_w, grad_b = torch.autograd.grad(y, (x, weight, bias), dy)

    close = dict(rtol=1e-4, atol=1e-5)
    for rank, result in enumerate(results):
        assert result["strides_match"]
        torch.testing.assert_close(result["y"], y[rank_slice(rank)].detach(), **close)
        torch.testing.assert_close(result["grad_x"], grad_x[rank_slice(rank)], **close)
        torch.testing.assert_close(result["running_mean"], running_mean, **close)
        torch.testing.assert_close(result["running_var"], running_var, **close)
    # Parameter gradients are each rank's own (DDP sums/averages them): together, the whole batch's.
    torch.testing.assert_close(sum(r["grad_w"] for r in results), grad_w, **close)
    torch.testing.assert_close(sum(r["grad_b"] for r in results), grad_b, **close)


def _few_values_worker(rank: int, store_path: str, out_dir: str) -> None:
    """Global batches of 0 values per channel (both ranks empty), then 1 (rank 0 holds one)."""
    store = dist.FileStore(store_path, WORLD)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=WORLD)
    try:
        bn = fastreg.SyncBatchNorm(CHANNELS, momentum=0.5)
        with torch.no_grad():
            bn.running_mean.fill_(5.0)
            bn.running_var.fill_(4.0)
        stats = []
        for samples in ((0, 0), (1, 0)):
            y = bn(torch.randn(samples[rank], CHANNELS, 1, 1))
            stats.append((bn.running_mean.clone(), bn.running_var.clone(), int(bn.num_batches_tracked), y.shape))
            del y  # before the group's destruction: see _worker
        torch.save(stats, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_fewer_than_two_values_over_all_processes_leave_the_running_statistics_alone(tmp_path):
    """None has no statistics (an empty batch leaves them alone, as fastreg's and torch's
    BatchNorm do), one has no unbiased variance: before, the first pulled the statistics
    towards 0 and the second made running_var NaN."""
    run_workers(_few_values_worker, (str(tmp_path / "store"), str(tmp_path)))
    for rank in range(WORLD):
        for step, (mean, var, batches, shape) in enumerate(torch.load(tmp_path / f"rank{rank}.pt")):
            assert torch.equal(mean, torch.full((CHANNELS,), 5.0)), (rank, step)
            assert torch.equal(var, torch.full((CHANNELS,), 4.0)), (rank, step)
            assert batches == step + 1  # counted, as torch counts an empty batch
            assert shape == (((0, 0), (1, 0))[step][rank], CHANNELS, 1, 1)


def test_without_a_process_group_it_is_batch_norm():
    x, _ = whole_batch()
    sync, plain = fastreg.SyncBatchNorm(CHANNELS), nn.BatchNorm2d(CHANNELS)
    torch.testing.assert_close(sync(x), plain(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(sync.running_var, plain.running_var, rtol=1e-5, atol=1e-6)


def test_convert_turns_torch_sync_batch_norm_into_fastregs():
    model = nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(nn.Conv2d(3, CHANNELS, 1), nn.BatchNorm2d(CHANNELS)))
    assert type(fastreg.convert(model)[1]) is fastreg.SyncBatchNorm
