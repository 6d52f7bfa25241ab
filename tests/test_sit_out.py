"""Parameters that sit out a micro-batch: the two-heads model on two-tasks data, and the check
that refuses DDP without find_unused_parameters before its ranks would wait on each other.
(The two-rank run of the sit-out experiment is in test_ddp.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from gradlab.config import spec as specs
from gradlab.config.settings import Settings
from gradlab.errors import GradlabError
from gradlab.lab import preflight, setups
from gradlab.setup import mse_loss


def sit_out_settings(**changes) -> Settings:
    trial = specs.expand(specs.load_spec("sit-out"))[0]
    s = next(a for a in trial.arms if a.name == "find-unused").settings
    return dataclasses.replace(s, **changes)


def test_a_head_whose_task_is_absent_gets_no_gradient_and_the_other_is_exact():
    s = sit_out_settings()
    setup = setups.build_setup(s, torch.device("cpu"), {})
    x, y = setup.train
    common = x[x[:, -1] == 0][:4], y[x[:, -1] == 0][:4]  # task 0 only
    loss, units = mse_loss(setup.model, common)
    loss.backward()
    heads = setup.model.heads
    assert heads[1].weight.grad is None and heads[1].bias.grad is None  # it sat out
    assert heads[0].weight.grad is not None and units == 4
    # each example is scored by its own task's head: the same as calling that head directly
    h = setup.model.trunk(common[0][:, :-1])
    torch.testing.assert_close(setup.model(common[0]), heads[0](h), rtol=0, atol=0)
    rare = float((x[:, -1] == 1).double().mean())
    assert 0.09 < rare < 0.16  # 1 example in 8, drawn


def test_ddp_without_find_unused_parameters_is_refused_before_the_ranks_wait():
    s = sit_out_settings(find_unused_parameters=False)
    arm = specs.Arm("find-unused", s, False)
    setup = setups.build_setup(s, torch.device("cpu"), {})
    with pytest.raises(GradlabError, match=r"arm 'find-unused': parameter heads\.1\.\w+ .*gets no "
                       r"gradient from rank \d's micro-batch 4 of 4 of the first window.* set "
                       r"find_unused_parameters=true"):
        preflight.check_every_parameter_syncs(arm, setup)
    assert all(p.grad is None for p in setup.model.parameters())  # left as it found it
    for fine in (sit_out_settings(), sit_out_settings(find_unused_parameters=False,
                                                      sync="never"),
                 sit_out_settings(find_unused_parameters=False, world_size=1)):
        preflight.check_every_parameter_syncs(specs.Arm("a", fine, False), setup)
