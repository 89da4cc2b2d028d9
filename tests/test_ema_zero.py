"""The sharded EMA sees exactly DeepSpeed's weights: two gloo ranks, ZeRO-2 and ZeRO-3, checked
against DeepSpeed's own gathered parameters (not against our own gather)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

from irg.embedded_store import free_port

pytestmark = pytest.mark.integration  # DeepSpeed on two spawned gloo ranks

WORLD = 2


def _model():
    torch.manual_seed(0)
    # Odd sizes, so chunks are uneven and the last rank's partition is padded.
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.GELU(), torch.nn.Linear(13, 5))


def _worker(rank: int, port: int, stage: int, results):
    os.environ.update({"DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "RANK": str(rank), "WORLD_SIZE": str(WORLD), "LOCAL_RANK": str(rank)})
    torch.set_num_threads(1)
    import deepspeed
    import torch.distributed as dist

    from irg.train.ema import ShardedEMA

    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    model = _model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
        "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30}, dist_init_required=False)
    ema = ShardedEMA(engine.module, decay=0.0, rank=rank, world_size=WORLD)  # decay 0: EMA = weights
    torch.manual_seed(rank)
    loss = engine(torch.randn(3, 7)).square().mean()
    engine.backward(loss)
    engine.step()
    ema.update()
    ours = ema.gather()
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
        theirs = {n: p.detach().clone() for n, p in params} if rank == 0 else None
    if rank == 0:
        results.put({n: (ours[n] - theirs[n]).abs().max().item() for n in theirs} | {
            "_moved": (theirs["0.weight"] - _model()[0].weight).abs().max().item()})
        results.close()
        results.join_thread()  # the result is in the pipe before the process leaves
    dist.destroy_process_group()
    # DeepSpeed's and gloo's native threads sometimes abort at interpreter exit ("terminate called
    # without an active exception", exit -6) after all work is done: leave without that teardown.
    os._exit(0)


@pytest.mark.parametrize("stage", [2, 3])
def test_ema_shards_hold_the_engines_weights(stage):
    port = free_port()
    context = mp.get_context("spawn")
    results = context.Queue()
    processes = [context.Process(target=_worker, args=(r, port, stage, results)) for r in range(WORLD)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=240)
    assert all(p.exitcode == 0 for p in processes), [p.exitcode for p in processes]
    errors = results.get(timeout=5)
    assert errors.pop("_moved") > 1e-3  # the step changed the weights, so a stale EMA would show
    assert max(errors.values()) < 1e-6, errors
