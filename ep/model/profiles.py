"""Measured machine profiles for `ep.model.sim`: rates and links, and the costs fitted to our runs.

Written by `python benchmarks/calibrate.py --write-profiles` from the benchmark runs under
`benchmarks/results/` (see `benchmarks/results/CALIBRATION.md` for predicted against
measured).
- Token waves (`wave_split="tokens"`, the layer's default; runs r16-r19, 2 H200s):
  `h200-nccl-tokens` (NVLink nodes of 8, the links of MEASURED.md's 4-GPU table, 45 GB/s
  between nodes), `h200-no-p2p-tokens` (NCCL without peer access: rows through host
  memory, the 2-GPU runs' measured ~23 GB/s), `h200-copy-engine-tokens`. GEMM rate from
  r17's stage-alone math (dsv3), weight reads, tiles, SM carveout and overlap shares from
  `../shared/MEASURED.md`, GPU time per kernel from r17's trace, host costs fitted to the
  measured host times, the backward's costs and the no-P2P share fitted to the rows.
- Expert waves (`wave_split="experts"`; runs r06-r15 of the retired expert-wave engine, exact sizes from a host exchange): the
  all-to-all links from the all-to-all table of `../shared/MEASURED.md` (latency +
  bytes / bandwidth fitted to the 4-GPU column); the grouped-GEMM table from the 1-GPU
  stage-alone runs (r06, dsv3 and decode shapes); host, kernel, overlap and backward
  costs are fitted.
"""
from __future__ import annotations

from dataclasses import replace

from .sim import Rates, Topology

# fmt: off
PROFILES = {
    "h200-nccl-tokens": (
        Rates(gemm_tflops=((1024.0, 640.9080775372917),), hbm_GBps=3970.0, permute_GBps=4300.0,
              stage_ms=0.0037, host_ms=0.0949, comm_share=0.142, compute_share=1.000,
              backward_factor=2.177, backward_host_ms=0.8310, a2a_host_ms=0.0571,
              name="h200-nccl-tokens", wave_split="tokens",
              call_host_ms=0.7882, replay_host_ms=0.00117, backward_launch_ms=0.04746,
              carveout_slowdown=((0.0, 1.0), (8.0, 1.0826), (16.0, 1.1116), (32.0, 1.2066)),
              comm_GBps_per_sm=2.797, roofline_p=2.0, gemm_tiles=True),
        Topology(ranks=8, gpus_per_node=8, intra_GBps=326.0, inter_GBps=45.0, latency_ms=0.0896, local_GBps=1500.0),
    ),
    "h200-nccl": (
        Rates(gemm_tflops=((32.0, 81.4), (1024.0, 609.8)), hbm_GBps=4000.0, permute_GBps=4300.0,
              stage_ms=0.0250, host_ms=0.0800, comm_share=0.142, compute_share=1.000,
              backward_factor=2.712, backward_host_ms=1.9929, a2a_host_ms=None,
              name="h200-nccl", wave_split="experts"),
        Topology(ranks=8, gpus_per_node=8, intra_GBps=326.0, inter_GBps=45.0, latency_ms=0.0896, local_GBps=1500.0),
    ),
    "h200-copy-engine": (
        Rates(gemm_tflops=((32.0, 81.4), (1024.0, 609.8)), hbm_GBps=4000.0, permute_GBps=4300.0,
              stage_ms=0.0250, host_ms=0.0800, comm_share=0.435, compute_share=1.000,
              backward_factor=2.712, backward_host_ms=1.9929, a2a_host_ms=0.19627840504352392,
              name="h200-copy-engine", wave_split="experts"),
        Topology(ranks=8, gpus_per_node=8, intra_GBps=326.0, inter_GBps=45.0, latency_ms=0.0896, local_GBps=1500.0),
    ),
    "cpu-gloo": (
        Rates(gemm_tflops=((256.0, 0.040894573426422276),), hbm_GBps=20.0, permute_GBps=0.5,
              stage_ms=0.2734, host_ms=0.5755, comm_share=0.886, compute_share=0.618,
              backward_factor=3.302, backward_host_ms=1.0200, a2a_host_ms=None,
              name="cpu-gloo", wave_split="experts"),
        Topology(ranks=4, gpus_per_node=4, intra_GBps=0.3, inter_GBps=0.3, latency_ms=0.5000, local_GBps=5.0),
    ),
}
PROFILES["h200-no-p2p-tokens"] = (
    replace(PROFILES["h200-nccl-tokens"][0], comm_share=0.2269, name='h200-no-p2p-tokens'),
    Topology(ranks=2, gpus_per_node=2, intra_GBps=23.0, inter_GBps=45.0, latency_ms=0.0717, local_GBps=1500.0),
)
PROFILES["h200-copy-engine-tokens"] = (
    replace(PROFILES["h200-nccl-tokens"][0], comm_share=0.4353, a2a_host_ms=0.1734, name='h200-copy-engine-tokens'),
    Topology(ranks=8, gpus_per_node=8, intra_GBps=326.0, inter_GBps=45.0, latency_ms=0.0896, local_GBps=1500.0),
)
# fmt: on
