"""Shared fixtures."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture
def one_thread():
    """Tiny models train faster on one thread than on two contending ones, and repeatably."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class _Watch:
    """Snapshots of user models; each is compared with the model when the test ends."""

    def __init__(self) -> None:
        self.snapshots: list[tuple[object, dict, list, list]] = []

    def __call__(self, model):
        state = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()}
        params = [(n, id(p), p.requires_grad) for n, p in model.named_parameters()]
        flags = [(n, m.training, type(m)) for n, m in model.named_modules()]
        self.snapshots.append((model, state, params, flags))
        return model

    def check(self) -> None:
        for model, state, params, flags in self.snapshots:
            now = model.state_dict(keep_vars=True)
            assert now.keys() == state.keys(), "the user's model gained or lost entries"
            for k, v in state.items():
                assert now[k].shape == v.shape and now[k].dtype == v.dtype, k
                torch.testing.assert_close(
                    now[k].detach(), v, rtol=0, atol=0, equal_nan=True, msg=f"model changed: {k}"
                )
            assert [(n, id(p), p.requires_grad) for n, p in model.named_parameters()] == params
            assert [(n, m.training, type(m)) for n, m in model.named_modules()] == flags


@pytest.fixture
def watch():
    """``watch(model)`` returns the model and asserts, after the test, that it was not mutated
    (state_dict values, parameter objects and requires_grad, modules and their train flags)."""
    w = _Watch()
    yield w
    w.check()
