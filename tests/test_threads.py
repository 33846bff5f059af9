"""`num_threads`: torch's thread count for a block, put back afterwards (also on an error)."""

from __future__ import annotations

import pytest
import torch

from lora_runtime._threads import num_threads


def test_sets_the_count_inside_and_restores_it_after_an_error():
    before = torch.get_num_threads()
    inside = 1 if before != 1 else 2
    with pytest.raises(KeyError), num_threads(inside):
        assert torch.get_num_threads() == inside
        raise KeyError("stop")
    assert torch.get_num_threads() == before


def test_none_leaves_the_count_alone():
    before = torch.get_num_threads()
    with num_threads(None):
        assert torch.get_num_threads() == before
    assert torch.get_num_threads() == before
