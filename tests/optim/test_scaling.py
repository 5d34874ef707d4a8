"""The depth dial reproduces nanochat's derived training settings (NANOCHAT_REFERENCE.md §2.6, V=32768, T=2048)."""

import math

import pytest

from modeling_nanochat import NanoChatConfig
from modeling_nanochat.optim.muon_adamw import build_param_groups
from modeling_nanochat.optim.scaling import PlanError, flops_per_token, parameter_counts, plan_training

# depth: (total params, scaling params N, FLOPs/token, B, iterations at ratio 12, warmdown iters, Muon wd,
#         lm_head lr, wte lr, value-embeds lr, resid lr, x0 lr, Muon lr)
TABLE = {
    4: (36_700_242, 11_534_384, 80_216_496, 262_144, 528, 343, 1.8899, 0.009798, 0.367423, 0.183712, 0.003536, 0.353553, 0.014142),
    12: (286_261_730, 110_100_912, 759_696_048, 524_288, 2_520, 1_638, 0.28, 0.008, 0.3, 0.15, 0.005, 0.5, 0.02),
    20: (896_533_746, 435_160_240, 2_886_212_784, 1_048_576, 4_980, 3_237, 0.10019, 0.008764, 0.328634, 0.164317, 0.007071, 0.707107, 0.028284),
    24: (1_384_122_122, 729_810_624, 4_775_225_616, 1_048_576, 8_352, 5_429, None, 0.008, 0.3, 0.15, 0.007071, 0.707107, 0.028284),
    26: (1_681_786_938, 918_423_532, 5_991_051_288, 1_048_576, 10_510, 6_832, 0.04747, 0.007686, 0.288231, 0.144115, 0.007071, 0.707107, 0.028284),
}


@pytest.mark.parametrize("depth", sorted(TABLE))
def test_depth_dial_matches_reference_table(depth):
    total, n, fpt, B, iters, warmdown, wd, lr_head, lr_wte, lr_ve, lr_resid, lr_x0, lr_muon = TABLE[depth]
    config = NanoChatConfig(depth=depth)
    counts = parameter_counts(config)
    assert counts["total"] == total
    assert flops_per_token(config) == fpt
    plan = plan_training(config, world_size=8, device_batch_size=16 if depth > 4 else 16)
    assert plan.num_scaling_params == n
    assert plan.total_batch_size == B
    assert plan.num_iterations == iters
    assert plan.warmdown_steps == warmdown
    if wd is not None:
        assert plan.weight_decay == pytest.approx(wd, abs=5e-5)
    # the LRs each optimizer group really gets (build_param_groups applies the (d/768)^-0.5 AdamW factor)
    import torch
    from modeling_nanochat import NanoChatForCausalLM
    with torch.device("meta"):
        model = NanoChatForCausalLM(config)
    groups = {g["name"]: g for g in build_param_groups(
        model, unembedding_lr=plan.unembedding_lr, embedding_lr=plan.embedding_lr, matrix_lr=plan.matrix_lr,
        scalar_lr=plan.scalar_lr, weight_decay=plan.weight_decay)}
    for name, want in (("lm_head", lr_head), ("embedding", lr_wte), ("value_embeds", lr_ve), ("resid", lr_resid),
                       ("x0", lr_x0)):
        assert groups[name]["lr"] == pytest.approx(want, abs=6e-7), name
    assert groups["smear"]["lr"] == 0.2
    assert all(g["lr"] == pytest.approx(lr_muon, abs=6e-7) for k, g in groups.items() if k.startswith("muon_"))


def test_speedrun_d24_ratio_8():
    plan = plan_training(NanoChatConfig(depth=24), world_size=8, device_batch_size=16, target_param_data_ratio=8)
    assert (plan.target_tokens, plan.total_batch_size, plan.num_iterations) == (5_838_484_992, 1_048_576, 5_568)
    assert plan.grad_accum_steps == 4
    assert plan.weight_decay == pytest.approx(0.05974, abs=5e-5)
    assert plan.warmdown_steps == 3_619


def test_cpu_demo_runcpu_settings():
    # runs/runcpu.sh: depth 6, head_dim 64, T=512, pattern L, B=16384 forced
    config = NanoChatConfig(depth=6, head_dim=64, max_position_embeddings=512, window_pattern="L")
    plan = plan_training(config, device_batch_size=32, total_batch_size=16_384, num_iterations=5000)
    assert plan.param_counts["total"] == 73_531_646
    assert plan.num_scaling_params == 23_199_960
    assert plan.flops_per_token == 153_355_680
    assert plan.batch_lr_scale == pytest.approx(0.17678, abs=1e-5)
    assert plan.weight_decay == pytest.approx(0.2349, abs=1e-4)
    assert plan.grad_accum_steps == 1 and plan.horizon_source == "num_iterations"


def test_horizon_precedence_and_target_flops():
    config = NanoChatConfig(depth=12)
    fpt = flops_per_token(config)
    plan = plan_training(config, target_flops=1e18)
    assert plan.horizon_source == "target_flops"
    assert plan.num_iterations == round(1e18 / (fpt * plan.total_batch_size))
    plan = plan_training(config, target_flops=1e18, num_iterations=7)
    assert plan.num_iterations == 7 and plan.horizon_source == "num_iterations"
    # ratio -1 (scaling_laws.sh): batch size and decay are unchanged, since they depend only on N / N(d12)
    a = plan_training(config, target_flops=1e18, target_param_data_ratio=-1)
    assert (a.total_batch_size, a.weight_decay) == (plan.total_batch_size, plan.weight_decay)


def test_schedules():
    plan = plan_training(NanoChatConfig(depth=12))  # 2520 iterations, warmdown 1638 from step 882
    N, W = plan.num_iterations, plan.warmdown_steps
    assert plan.lr_multiplier(0) == 1 / 40 and plan.lr_multiplier(39) == 1.0
    assert plan.lr_multiplier(N - W) == 1.0
    assert plan.lr_multiplier(N) == pytest.approx(0.05)
    p = (N - 2000) / W
    assert plan.lr_multiplier(2000) == pytest.approx(p + (1 - p) * 0.05)
    assert plan.muon_momentum(0) == 0.85 and plan.muon_momentum(200) == pytest.approx(0.91)
    assert plan.muon_momentum(400) == 0.97 if 400 < N - W else True
    assert plan.muon_momentum(N) == pytest.approx(0.90)
    assert plan.muon_weight_decay(0) == plan.weight_decay
    assert plan.muon_weight_decay(N // 2) == pytest.approx(plan.weight_decay * 0.5 * (1 + math.cos(math.pi * (N // 2) / N)))
    assert plan.muon_weight_decay(N) == pytest.approx(0.0, abs=1e-12)


def test_impossible_batch_is_a_clear_error_before_compute():
    # the reference's d4 footgun: B = 262144 on 8 GPUs at device batch 32 is not whole
    with pytest.raises(PlanError, match=r"use --device-batch-size 16"):
        plan_training(NanoChatConfig(depth=4), world_size=8, device_batch_size=32)
    with pytest.raises(PlanError, match="multiple of"):
        plan_training(NanoChatConfig(depth=4, max_position_embeddings=64), total_batch_size=1000, device_batch_size=1)
    with pytest.raises(PlanError, match="no training horizon"):
        plan_training(NanoChatConfig(depth=4), target_param_data_ratio=-1)
