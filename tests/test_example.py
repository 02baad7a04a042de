"""The training example (examples/train_deepseek_v4.py) on 4 Gloo ranks: its loss at each
of 20 steps equals the single-process `transformers` model's within 1e-6 relative (float64)."""
import importlib.util
import os

import pytest

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "examples", "train_deepseek_v4.py")


def _example():
    spec = importlib.util.spec_from_file_location("train_deepseek_v4", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_example(rank, n):
    example = _example()
    losses = example.train_expert_parallel(example.STEPS)
    reference = example.train_single_process(example.STEPS) if rank == 0 else None
    return losses, reference


def test_training_example_matches_transformers():
    pytest.importorskip("transformers")
    from tests.world import run_world

    out = run_world(4, check_example, timeout_s=300)
    losses, reference = out[0]
    assert len(losses) == 20 and all(o[0] == losses for o in out)  # every rank saw the same batch loss
    worst = max(abs(a - b) / abs(b) for a, b in zip(losses, reference))
    print(f"example: 20 steps, loss {reference[0]:.4f} -> {reference[-1]:.4f}, largest relative difference {worst:.1e}")
    assert worst <= 1e-6, list(zip(losses, reference))
    assert reference[-1] < 0.7 * reference[0]  # it learns
