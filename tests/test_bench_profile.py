"""bench.profile's reduction of a profiled step's device events (synthetic events: the profiler's own
device events exist on a GPU only)."""
import random

import pytest

from bench.profile import busy_seconds, kind, markdown_rows, summarize


def test_busy_time_is_the_union_of_the_intervals():
    """Overlapping, nested, touching and disjoint intervals, in any order, against a per-nanosecond count."""
    rng = random.Random()
    for _ in range(200):
        intervals = []
        for _ in range(rng.randint(0, 12)):
            start = rng.randint(0, 300)
            intervals.append((start, start + rng.randint(0, 60)))
        covered = {ns for start, stop in intervals for ns in range(start, stop)}
        assert busy_seconds(rng.sample(intervals, len(intervals))) == pytest.approx(len(covered) / 1e9, abs=1e-15)


@pytest.mark.parametrize("name, want", [
    ("_adaln_fwd_kernel", "ours"), ("_attn_bwd_dkdv_kernel", "ours"), ("void alignflow::adamw_step<float>(...)", "ours"),
    ("triton_poi_fused_add_mul_0", "inductor"), ("triton_red_fused_sum_3", "inductor"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"), ("ampere_bf16_s16816gemm_bf16_128x128_ldg8", "matmul"),
    ("pytorch_flash::flash_fwd_kernel<...>", "attention"),
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3", "attention"), ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    ("void at::native::(anonymous namespace)::multi_tensor_apply_kernel<...>", "optimizer"),
    ("Memcpy DtoD (Device -> Device)", "copy"), ("Memset (Device)", "copy"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>, ...>", "other"),
])
def test_kernel_kinds_by_name(name, want):
    assert kind(name) == want


def test_summary_of_a_step():
    ms = 1_000_000
    events = [("sm90_xmma_gemm_bf16", 0, 4 * ms), ("_adaln_fwd_kernel", 5 * ms, 1 * ms),
              ("triton_poi_fused_0", 5 * ms, 2 * ms), ("Memset (Device)", 9 * ms, 1 * ms)]
    summary = summarize(events, step_s=0.012)
    assert summary["busy_s"] == pytest.approx(0.007)
    assert summary["idle_s"] == pytest.approx(0.005)
    assert summary["kernels"] == 4
    assert summary["by_kind"] == pytest.approx({"matmul": 0.004, "inductor": 0.002, "ours": 0.001, "copy": 0.001})
    lines = markdown_rows([{"variant": "alignflow", "device_profile": summary}, {"variant": "reference-eager"}])
    assert len(lines) == 5 and lines[-1] == "| alignflow | 12.0 | 7.0 | 5.0 | 42% | 4 | 1.0 | 2.0 | 0.0 | 4.0 | 0.0 | 1.0 | 0.0 |"
    assert markdown_rows([{"variant": "alignflow"}]) == []
