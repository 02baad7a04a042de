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


def check_fp8_curves(rank, n, scaling):
    return _example().fp8_loss_curves(_example().STEPS, None, scaling)


@pytest.mark.parametrize("scaling", ["blocks", "rows"])
def test_fp8_training_stays_near_the_unquantized_curve(scaling):
    """The example's `--fp8` comparison on 2 Gloo ranks: FP8 experts and FP8 dispatch train to
    within the stated distance of the unquantized ep layers (and are not them)."""
    pytest.importorskip("transformers")
    from tests.world import run_world

    example = _example()
    quantized, plain = run_world(2, check_fp8_curves, scaling, timeout_s=300)[0]
    distance = example.fp8_distance(quantized, plain)
    print(f"fp8 ({scaling}) training: {distance}")
    assert all(v <= example.FP8_TOLERANCE[k] for k, v in distance.items()), distance
    assert distance["first step"] > 1e-5  # quantized: not the unquantized run
    assert plain[-1] < 0.7 * plain[0] and quantized[-1] < 0.7 * quantized[0]  # both learn
