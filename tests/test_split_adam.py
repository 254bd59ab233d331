"""dlrm.split_adam: the ranks' shares, and on real mpiexec ranks the same steps as replicated Adam."""

import copy
import json
from pathlib import Path

import torch
from torch import nn

from dlrm.split_adam import SplitAdam, shares
from tests.test_dlrm_end_to_end import run


def test_shares_go_largest_first_to_the_least_loaded_rank():
    assert shares([10, 50, 30, 20], 2) == [0, 0, 1, 1]  # 50 + 10 | 30 + 20 (the tie to rank 0)
    assert shares([5, 5, 5], 1) == [0, 0, 0]
    assert shares([7], 3) == [0]  # ranks 1 and 2 update nothing


def test_the_small_profiles_mlps_split_within_a_few_percent():
    # dlrm.model's small profile: the top MLP's then the bottom MLP's weights and biases.
    sizes = [416 * 512, 512, 512 * 256, 256, 256, 1, 13 * 512, 512, 512 * 256, 256, 256 * 64, 64]
    owner = shares(sizes, 2)
    loads = [sum(n for n, o in zip(sizes, owner) if o == r) for r in range(2)]
    assert sum(loads) == 500_033 and abs(loads[0] - loads[1]) < 0.1 * sum(loads)


def parameters() -> list[nn.Parameter]:
    """Parameters like the MLPs': a column-major weight among them (dlrm.model.column_major)."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (64,), (16, 64), (16,), (1, 16), (1,)]
    params = [nn.Parameter(torch.randn(*shape, generator=generator)) for shape in shapes]
    params[0] = nn.Parameter(params[0].detach().t().contiguous().t())
    return params


def step_worker(out: str) -> None:
    """On every rank: SplitAdam and replicated Adam take the same steps (gradients and rates as in
    training, the same on every rank after the all-reduce); the weights must match bit for bit, on every
    rank; then the split optimizer's state dict is loaded into a fresh split optimizer and into a
    replicated one, and both carry on alike."""
    from dlrm import dist, shm

    info = dist.launcher_env()
    dist.init(info, "gloo")
    group = shm.open_group(info.rank, info.world_size, capacity=4096, timeout_s=60)
    split, replicated = parameters(), parameters()
    split_adam = SplitAdam(split, 0.01, info.rank, info.world_size, group)
    adam = torch.optim.Adam(replicated, lr=0.01, fused=True)

    def step(optimizers: list, params: list[list[nn.Parameter]], k: int) -> None:
        for opt, ps in zip(optimizers, params):
            for i, p in enumerate(ps):
                p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(10 * k + i))
            for g in opt.param_groups:
                g["lr"] = 0.01 / (k + 1)
            opt.step()

    for k in range(3):
        step([split_adam, adam], [split, replicated], k)
    same = all(torch.equal(a, b) for a, b in zip(split, replicated))
    saved = split_adam.state_dict()
    reference = adam.state_dict()
    same_state = saved["param_groups"] == reference["param_groups"] and sorted(saved["state"]) == sorted(reference["state"]) \
        and all(torch.equal(saved["state"][i][key], reference["state"][i][key])
                for i in reference["state"] for key in ("step", "exp_avg", "exp_avg_sq"))
    # Resumed both ways: a fresh split optimizer from the split state, a replicated one from it too.
    resumed, replicated_again = [nn.Parameter(p.detach().clone()) for p in split], parameters()
    with torch.no_grad():
        for a, b in zip(replicated_again, split):
            a.copy_(b)
    resumed_adam = SplitAdam(resumed, 0.01, info.rank, info.world_size, group)
    # (Copies, as from a checkpoint file: a state dict holds the optimizer's live tensors.)
    resumed_adam.load_state_dict(copy.deepcopy(saved))
    adam_again = torch.optim.Adam(replicated_again, lr=0.01, fused=True)
    adam_again.load_state_dict(copy.deepcopy(saved))
    for k in range(3, 5):
        step([resumed_adam, adam_again, adam], [resumed, replicated_again, replicated], k)
    resumed_same = all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(resumed, replicated_again, replicated))
    Path(out, f"rank{info.rank}.json").write_text(json.dumps({
        "same": same, "same_state": same_state, "resumed_same": resumed_same, "mine": split_adam.mine,
        "weights": [p.detach().flatten().tolist() for p in resumed]}))
    group.close()
    dist.finish()


def test_split_adam_steps_exactly_like_replicated_adam_and_checkpoints_in_its_format(tmp_path):
    run(["-c", f"from tests.test_split_adam import step_worker; step_worker({str(tmp_path)!r})"], ranks=3)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(3)]
    assert all(r["same"] and r["same_state"] and r["resumed_same"] for r in ranks), ranks
    assert ranks[0]["weights"] == ranks[1]["weights"] == ranks[2]["weights"]  # bit-identical replicas
    # Every parameter stepped by exactly one rank: 2048, 64, 1024, 16, 16, 1 elements over 3 ranks.
    assert [r["mine"] for r in ranks] == [[0], [2], [1, 3, 4, 5]]
