"""VersionCache: a value reused until one of the tensors it was computed from is updated in place or replaced."""

import copy

import pytest
import torch
from torch import nn

from flowforge.nn.version_cache import VersionCache


class Owner(nn.Module):
    norm_cache = VersionCache()

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(3))
        self.register_buffer("other", torch.zeros(2))
        self.computed = 0

    def norm(self) -> float:
        def compute():
            self.computed += 1
            return float(self.weight.detach().norm())

        return self.norm_cache.get_or_compute((self.weight,), compute)


def test_reused_until_an_in_place_update():
    m = Owner()
    assert m.norm() == m.norm() == pytest.approx(3**0.5)
    assert m.computed == 1
    opt = torch.optim.SGD(m.parameters(), lr=1.0)
    m.weight.grad = torch.ones(3)
    opt.step()  # the optimiser updates the parameter in place
    assert m.norm() == 0.0 and m.computed == 2
    with torch.no_grad():
        m.weight.mul_(1.0)  # an in-place update that happens to leave the values unchanged still invalidates
    m.norm()
    assert m.computed == 3


def test_invalidated_by_replacing_the_tensor():
    m = Owner()
    m.norm()
    m.weight = nn.Parameter(torch.full((3,), 2.0))  # a new tensor, version 0 like the old one was at first
    assert m.norm() == pytest.approx(2.0 * 3**0.5) and m.computed == 2
    with torch.no_grad():
        m.weight.data = torch.zeros(3)  # same Parameter object, new storage
    assert m.norm() == 0.0 and m.computed == 3
    m.load_state_dict({"weight": torch.ones(3), "other": torch.zeros(2)})  # copies in place
    assert m.norm() == pytest.approx(3**0.5) and m.computed == 4


def test_not_invalidated_by_an_unrelated_tensor():
    m = Owner()
    m.norm()
    with torch.no_grad():
        m.other.add_(1.0)
    m.norm()
    assert m.computed == 1


def test_one_cache_per_instance_and_copies_recompute():
    a, b = Owner(), Owner()
    a.norm()
    with torch.no_grad():
        b.weight.mul_(2.0)
    assert b.norm() == pytest.approx(2 * 3**0.5) and a.norm() == pytest.approx(3**0.5)
    assert (a.computed, b.computed) == (1, 1)
    c = copy.deepcopy(a)
    with torch.no_grad():
        c.weight.zero_()
    assert c.norm() == 0.0 and a.norm() == pytest.approx(3**0.5)
    assert "norm_cache" not in "".join(a.state_dict())


def test_get_put_extra_and_clear():
    t, u = torch.zeros(2), torch.zeros(2)
    cache = VersionCache()
    assert cache.get((t,)) is None and cache.get((t,), default=7) == 7
    cache.put((t, u), "value", extra=torch.float32)
    assert cache.get((t, u), extra=torch.float32) == "value"
    assert cache.get((t, u), extra=torch.float64) is None  # another extra key
    assert cache.get((u, t), extra=torch.float32) is None  # other tensors
    u += 1
    assert cache.get((t, u), extra=torch.float32) is None
    cache.put((t, u), "again")
    cache.clear()
    assert cache.get((t, u)) is None
