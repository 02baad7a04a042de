"""The Triton kernels of the token-wave path, compiled for the H200 (sm_90) on this CPU host.

Triton's interpreter (tests/test_triton_kernels.py) checks what the kernels compute but not
whether the compiler accepts them: r17's first GPU run failed on a kernel the interpreter had
passed (a name redefined with another shape in a branch). This compiles each kernel, with
the argument types the layer gives it, from Python down to PTX (and the cubin where Triton
carries its assembler), no GPU needed. It runs in a fresh process: the interpreter tests
switch Triton's interpreter on for this one (`python tests/test_triton_compile.py` runs it
alone).
"""
import importlib.util
import os
import subprocess
import sys

import pytest

P = lambda t: "*" + t  # noqa: E731  a pointer argument
I32 = "i32"
COMMON = dict(T=I32, E=I32, E_local=I32, n=I32, W=I32, NB=I32)


def _cases():
    from ep.kernels import triton_fp8 as tf
    from ep.kernels import triton_plan as tc
    from ep.kernels import triton_grouped as tg
    from ep.kernels import triton_p2p as tp
    from ep.kernels import triton_rows as tr
    from ep.kernels import triton_swiglu as ts

    p2p = dict(words=P("i64"), groups=P("i64"), sizes=P("i64"), uses=P("i64"), err_addr="i64", me=I32, n=I32,
               call_at="i64", per_src="i64", first=I32, chunks=I32, ready_at=I32, freed_at=I32, deadline="i64",
               label=I32, arrived_rows=P("i64"), row_pieces=I32, split="i64")
    wide = dict(BLOCK=8192, ALIGN=4, PER_GROUP=4, CHUNKS=32, USE_CLOCK=True, HAS_SENT=True, UNIFORM=True)
    byte = dict(BLOCK=32768, ALIGN=1, PER_GROUP=16, CHUNKS=32, USE_CLOCK=True, HAS_SENT=False, UNIFORM=False)
    quant = dict(q=P("fp8e4nv"), s=P("fp32"), T=I32, q_stride=I32, s_stride=I32)
    fp8_grouped = dict(x=P("fp8e4nv"), xs=P("fp32"), w=P("fp8e4nv"), ws=P("fp32"), offs=P("i32"), out=P("bf16"),
                       N=I32, E=I32, x_stride=I32, xs_stride=I32, w_se="i64", w_sk=I32, w_sn=I32, ws_se=I32,
                       ws_sk=I32, ws_sn=I32, out_stride=I32)
    bm, bn, _, _ = tf.GROUPED_CONFIG
    return [
        (tf._quantize_rows_kernel, dict(x=P("bf16"), x_stride=I32, **quant), dict(TILES=8, POW2=False)),
        (tf._quantize_rows_kernel, dict(x=P("bf16"), x_stride=I32, **quant), dict(TILES=8, POW2=True)),
        (tf._swiglu_quantize_kernel, dict(h=P("bf16"), F=I32, limit="fp32", h_stride=I32, **quant),
         dict(TILES=8, HAS_LIMIT=True, POW2=False)),
        (tf._quantize_blocks_kernel, dict(w=P("bf16"), q=P("fp8e4nv"), s=P("fp32"), K=I32, N=I32, w_se="i64",
                                          w_sk=I32, w_sn=I32, q_se="i64", q_sk=I32, q_sn=I32, s_se=I32, s_sk=I32,
                                          s_sn=I32), dict(POW2=False)),
        *((tf._rowwise_kernel, dict(x=P(x_type), xs=P("fp32"), index=P("i64"), count=P("i64"), q=P("fp8e4nv"),
                                    s=P("fp32"), copy=P(x_type), x_stride=I32, xs_stride=I32, q_stride=I32,
                                    copy_stride=I32, limit="fp32"),
           dict(K=7168 if mode < 2 else 2048, MODE=mode, HAS_INDEX=mode < 2, HAS_COUNT=mode < 2, HAS_LIMIT=mode == 2,
                POW2=False, HAS_COPY=copy, BLOCK_K=1024))
          for mode, x_type, copy in ((0, "bf16", False), (0, "bf16", True), (1, "fp8e4nv", False), (2, "bf16", False))),
        (tf._quantize_columns_kernel, dict(w=P("bf16"), q=P("fp8e4nv"), s=P("fp32"), N=I32, w_se="i64",
                                           w_sk=I32, w_sn=I32, q_se="i64", q_sk=I32, q_sn=I32, s_se=I32),
         dict(K=7168, POW2=False, BLOCK_N=64)),
        (tf._columns_per_group_kernel, dict(x=P("bf16"), offs=P("i32"), q=P("fp8e4nv"), s=P("fp32"), C=I32, E=I32,
                                            x_stride=I32, q_stride=I32),
         dict(EP=32, ALIGN=16, POW2=False, BLOCK_T=64, BLOCK_C=64)),
        (tf._fp8_grouped_kernel, fp8_grouped, dict(K=7168, EP=32, BLOCK_M=bm, BLOCK_N=bn)),  # dsv3 linear1
        (tf._fp8_grouped_kernel, fp8_grouped, dict(K=2048, EP=32, BLOCK_M=bm, BLOCK_N=bn)),  # dsv3 linear2
        (tp._put_kernel, dict(src=P("i32"), out=P("i32"), arena=P("i32"), sent_rows=P("i64"), wait_programs=I32,
                              **p2p), wide),
        (tp._take_kernel, dict(out=P("i32"), arena=P("i32"), put_programs=I32, **p2p), wide),
        (tp._put_kernel, dict(src=P("u8"), out=P("u8"), arena=P("u8"), sent_rows=P("i64"), wait_programs=I32, **p2p),
         byte),
        (tp._take_kernel, dict(out=P("u8"), arena=P("u8"), put_programs=I32, **p2p), byte),
        (tg._few_rows_kernel, dict(x=P("bf16"), index=P("i64"), w=P("bf16"), offs=P("i32"), out=P("bf16"), N=I32,
                                   x_stride=I32, w_se="i64", w_sk=I32, out_stride=I32),
         dict(K=7168, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GATHER=True)),
        (tg._few_rows_kernel, dict(x=P("bf16"), index=P("i64"), w=P("bf16"), offs=P("i32"), out=P("bf16"), N=I32,
                                   x_stride=I32, w_se="i64", w_sk=I32, out_stride=I32),
         dict(K=2048, BLOCK_M=64, BLOCK_N=128, BLOCK_K=64, GATHER=False)),
        (tc._route_count_kernel, dict(idx_ptr=P("i64"), w_ptr=P("fp32"), counts_ptr=P("i32"), status_ptr=P("i32"),
                                      clamped_ptr=P("i64"), row_token_ptr=P("i64"), cap=I32, **COMMON),
         dict(K=8, KP=8, HAS_W=True, BT=32, SLOT_RANGE=5, SLOT_REPEAT=6, SLOT_NONFINITE=7, MODE=2, CHECKS=True)),
        (tc._route_place_kernel, dict(idx_ptr=P("i64"), counts_ptr=P("i32"), route_ptr=P("i64"), row_token_ptr=P("i64"),
                                      status_ptr=P("i32"), region_rows_ptr=P("i64"), cap=I32, **COMMON),
         dict(K=6, KP=8, BT=32, NBP=128, SLOT_OVER=10, MODE=1)),
        (tc._returned_slots_kernel, dict(route_ptr=P("i64"), idx_ptr=P("i64"), values_ptr=P("fp32"), out_ptr=P("fp32"),
                                         T=I32, n=I32, E_local=I32, W=I32, v_stride=I32),
         dict(K=8, KP=8, BT=128, PER_WAVE_COLS=True)),
        (tr._gather_slots_kernel, dict(values=P("fp32"), items=P("i64"), out=P("fp32"), N=I32, out_stride=I32),
         dict(K=8, KP=8, BN=128)),
        *((tc._pack_kernel, dict(x_ptr=P("bf16"), idx_ptr=P("i64"), w_ptr=P("fp32"), row_token_ptr=P("i64"),
                                 status_ptr=P("i32"), data_ptr=P("fp8e4nv" if quant else "bf16"), ids_ptr=P("i32"),
                                 wts_ptr=P("fp32"), st_ptr=P("i32"), back_row_ptr=P("i64"), back_ptr=P("i32"),
                                 scale_ptr=P("fp32"), H=I32, x_stride=I32, data_stride=I32, meta_stride=I32,
                                 wts_stride=I32, scale_stride=I32, E=I32, E_local=I32, n=I32, W=I32, cap=I32),
           dict(K=8, KP=8, S=11, SP=16, HAS_W=True, BLOCK=1024, MODE=2, QUANT=quant)) for quant in (False, True)),
        (tc._count_kernel, dict(ids_ptr=P("i32"), counts_ptr=P("i32"), N=I32, B=I32, E_local=I32, ids_stride=I32),
         dict(K=8, KP=8, BR=16, EP=32)),
        (tc._items_scan_kernel, dict(counts_ptr=P("i32"), incl_ptr=P("i64"), B=I32), dict(BB=512)),
        (tc._place_kernel, dict(ids_ptr=P("i32"), w_ptr=P("fp32"), incl_ptr=P("i64"), counts_ptr=P("i32"),
                                slot_item_ptr=P("i64"), item_row_ptr=P("i64"), item_w_ptr=P("fp32"), item_e_ptr=P("i64"),
                                offs_ptr=P("i32"), N=I32, B=I32, E_local=I32, I=I32, ids_stride=I32, w_stride=I32),
         dict(K=8, KP=8, BR=16, EP=32)),
        (tr._gather_rows_kernel, dict(src=P("bf16"), index=P("i64"), out=P("bf16"), rows_used=P("i32"), H=I32,
                                      src_stride=I32, out_stride=I32), dict(BLOCK=1024, HAS_ROWS=True)),
        (tr._reduce_rows_kernel, dict(src=P("bf16"), items=P("i64"), weights=P("fp32"), out=P("bf16"), H=I32,
                                      src_stride=I32, out_stride=I32, w_stride=I32), dict(K=8, HAS_W=True, BLOCK=1024)),
        (ts._swiglu_fwd_kernel, dict(h=P("bf16"), a=P("bf16"), F=I32, limit="fp32", rows_used=P("i32")),
         dict(BLOCK=1024, HAS_LIMIT=True, HAS_ROWS=True)),
        *((ts._swiglu_bwd_kernel, dict(g=P("bf16"), h=P("bf16"), w=P("fp32"), dh=P("bf16"), wa=P("bf16"),
                                       dweight=P("fp32"), dq=P("fp8e4nv" if quant else "bf16"),
                                       ds=P("fp32"), limit="fp32", rows_used=P("i32")),
           dict(F=2048, BLOCK=2048, HAS_LIMIT=False, HAS_ROWS=True, QUANT=quant)) for quant in (False, True)),
    ]


def compile_for_sm90(fn, types, consts) -> None:
    import triton
    from triton.backends.compiler import GPUTarget

    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name], constexprs[(i,)] = "constexpr", consts[name]
        else:
            signature[name] = types[name]
            if types[name].startswith("*"):  # as the JIT specialises a 16-byte aligned tensor
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32))
    except RuntimeError as e:  # no PTX assembler with this triton build: the front end still ran
        if "ptxas" not in str(e):
            raise
        return
    ptx = compiled.asm.get("ptx")
    assert ptx, f"{fn.__name__}: no PTX"
    if fn.__name__ in ("_put_kernel", "_take_kernel") and consts["ALIGN"] == 4:  # sizes in 16-byte pieces
        assert ".v4.b32" in ptx and ".global.b32" not in ptx, f"{fn.__name__}: rows not moved in 16-byte accesses"


def main() -> int:
    for fn, types, consts in _cases():
        compile_for_sm90(fn, types, consts)
        print(f"compiled {fn.__name__} {consts}", flush=True)
    return 0


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, cwd=root, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    assert done.stdout.count("compiled ") == len(_cases())

if __name__ == "__main__":
    sys.exit(main())
