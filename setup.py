from setuptools import find_packages, setup

setup(
    name="ep",
    version="0.1.0",
    description="A wave-pipelined expert-parallel Mixture-of-Experts runtime on PyTorch",
    packages=find_packages(include=["ep", "ep.*"]),
    python_requires=">=3.10",
    # torch 2.8: torch._grouped_mm (the bf16 grouped GEMMs on CUDA, ep/kernels/grouped.py) first
    # ships there; the copy-engine transport's symmetric-memory calls
    # (torch.distributed._symmetric_memory.empty / rendezvous / get_buffer) are there by then. The rest needs
    # less (TCPStore(master_listen_fd) in ep/dist.py: 2.4; init_process_group(device_id): 2.3;
    # non-reentrant checkpointing, save_on_cpu, meta-device construction: 2.1). Tested: 2.13.0.
    install_requires=["torch>=2.8", "numpy"],
    extras_require={"test": ["pytest>=8", "hypothesis>=6", "transformers==5.24.0"], "bench": ["matplotlib>=3.7"],
                    "hf": ["transformers>=5.24"]},
)
