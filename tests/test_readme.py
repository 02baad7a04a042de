"""The README's "Using the layer" example runs verbatim in one process (no launcher), and the
layer it builds matches the float64 reference there (issue 14: it crashed on a GPU)."""
from tests import readme_example


def test_readme_example_verbatim_and_against_the_reference():
    names = readme_example.run_example()
    assert names["y"].shape == names["x"].shape and names["group"] is None
    # the layer it built, in the one-process world, against the float64 reference (the GPU
    # check runs every split, W and dtype: `python3 tests/readme_example.py`)
    for split, W in (("tokens", 2), ("experts", 1)):
        got = readme_example.check_layer(names["layer"], names["x"], names["x"].dtype, num_waves=W, wave_split=split)
        assert got["ok"], (split, W, got)


def test_one_process_transport_follows_the_tensors_device():
    """The one-process transport's exchanges stay where their input is (the plan's count table
    came back on the CPU for a CUDA layer); checked on devices this machine has, the meta
    device included, without a GPU."""
    import torch

    from ep.transport import make_transport

    tr = make_transport(None)
    for device in ("cpu", "meta"):
        t = torch.zeros(1, 5, dtype=torch.int64, device=device)
        assert tr.exchange(t).device.type == device
