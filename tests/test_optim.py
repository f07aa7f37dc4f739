"""SparseOptimizer: proximal steps, schedule, frozen masks, checkpoints, schedulers, Trainer."""

from __future__ import annotations

import copy
import io
import math
import warnings

import pytest
import torch
from conftest import small_llama
from torch import nn

from sparsellm.optim import SparseOptimizer, decoder_layers, sparsifiable_parameters


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors gain nothing from intra-op threads, and on a busy 2-core machine the
    OpenMP workers spin-wait: one thread is many times faster here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(seed: int = 0) -> nn.Module:
    return small_llama(seed)


def prune_half(params) -> None:
    """Zero the smaller-magnitude half of each tensor (rank-based, so exactly half)."""
    with torch.no_grad():
        for p in params:
            order = torch.sort(p.abs().reshape(-1), stable=True).indices
            p.view(-1)[order[: p.numel() // 2]] = 0


def regression_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(16, 8, generator=gen)
    y = torch.randn(16, 4, generator=gen)
    opt.zero_grad()
    nn.functional.mse_loss(model(x), y).backward()
    opt.step()


def small_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))


# --- the proximal maps ------------------------------------------------------------------------


def test_l1_soft_threshold_matches_prox_per_group_lr():
    w = nn.Parameter(torch.tensor([1.0, -0.5, 0.05, -0.08, 0.0, 2.0]))
    u = nn.Parameter(torch.tensor([0.3, -0.3, 0.1]))
    other = nn.Parameter(torch.tensor([0.01, -0.01]))  # optimised, not sparsified
    base = torch.optim.SGD([{"params": [w, other], "lr": 0.1}, {"params": [u], "lr": 0.4}])
    opt = SparseOptimizer(base, params_to_sparsify=[w, u], penalty="l1", lam=0.5)
    w.grad = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 10.0])  # z = w − 0.1·g: 2.0 → 1.0
    u.grad = torch.zeros(3)
    other.grad = torch.tensor([0.0, 1.0])
    opt.step()
    # group 0: τ = 0.1·0.5 = 0.05; group 1: τ = 0.4·0.5 = 0.2
    torch.testing.assert_close(w.detach(), torch.tensor([0.95, -0.45, 0.0, -0.03, 0.0, 0.95]))
    torch.testing.assert_close(u.detach(), torch.tensor([0.1, -0.1, 0.0]))
    torch.testing.assert_close(other.detach(), torch.tensor([0.01, -0.11]))  # SGD only
    assert opt.sparse_step == 1


def test_l0_hard_threshold_matches_prox():
    # τ = lr·λ = 0.5·0.25 = 0.125 → keep iff |z| > √(2τ) = 0.5 (exactly representable)
    w = nn.Parameter(torch.tensor([0.6, -0.5, 0.49, -0.7, 0.5, 0.0, 1.0]))
    opt = SparseOptimizer(torch.optim.SGD([w], lr=0.5), penalty="l0", lam=0.25)
    w.grad = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6])  # z = 1.0 − 0.3 = 0.7
    opt.step()
    assert torch.equal(w.detach(), torch.tensor([0.6, 0.0, 0.0, -0.7, 0.0, 0.0, 0.7]))
    assert opt.sparsity() == pytest.approx(4 / 7)


@pytest.mark.parametrize("penalty", ["l1", "l0"])
@pytest.mark.parametrize("preconditioned", [True, False])
def test_adam_threshold_in_the_adam_metric(penalty, preconditioned):
    torch.manual_seed(0)
    init = torch.randn(40) * 0.01
    lr, eps = 1e-2, 1e-8
    lam = 0.5 if penalty == "l1" else 3e-3
    # Coordinates with very different gradient scales, so the Adam metric matters.
    scales = torch.logspace(-2, 1, 40)
    ref = nn.Parameter(init.clone())
    ref_opt = torch.optim.Adam([ref], lr=lr, eps=eps)
    w = nn.Parameter(init.clone())
    opt = SparseOptimizer(
        torch.optim.Adam([w], lr=lr, eps=eps),
        penalty=penalty,
        lam=lam,
        preconditioned=preconditioned,
    )
    for step in range(1, 4):
        grad = torch.randn(40) * scales
        ref.grad, w.grad = grad.clone(), grad.clone()
        ref_opt.step()
        with torch.no_grad():
            z = ref.detach().clone()  # Adam's own update of the *proxed* iterate
            if preconditioned:
                v_hat = ref_opt.state[ref]["exp_avg_sq"] / (1 - 0.999**step)
                tau = lr * lam / (v_hat.sqrt() + eps)
            else:
                tau = torch.full_like(z, lr * lam)
            if penalty == "l1":
                expected = z.sign() * (z.abs() - tau).clamp_min(0)
            else:
                expected = torch.where(z.abs() > (2 * tau).sqrt(), z, torch.zeros_like(z))
            ref.copy_(expected)
        opt.step()
        torch.testing.assert_close(w.detach(), ref.detach(), rtol=1e-6, atol=1e-9)
    # The thresholds really bit: some, but not all, coordinates are zero.
    assert 0 < int((w == 0).sum()) < 40


@pytest.mark.parametrize(
    "make_base",
    [
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-2, nesterov=True),
        lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    ],
    ids=["sgd-momentum", "adamw"],
)
def test_lam_zero_is_bit_identical_to_base(make_base):
    plain, wrapped = small_mlp(), small_mlp()
    base_opt = make_base(plain.parameters())
    sparse_opt = SparseOptimizer(make_base(wrapped.parameters()), penalty="l1", lam=0.0)
    for step in range(6):
        regression_step(plain, base_opt, seed=step)
        regression_step(wrapped, sparse_opt, seed=step)
    for a, b in zip(plain.parameters(), wrapped.parameters(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(plain[0].weight, small_mlp()[0].weight)  # it did train


# --- target-sparsity schedule -------------------------------------------------------------


def expected_sparsity(kind: str, s0: float, sf: float, t: int, total: int) -> float:
    frac = min(t / total, 1.0)
    if kind == "cubic":
        return sf + (s0 - sf) * (1 - frac) ** 3
    return s0 + (sf - s0) * frac


@pytest.mark.parametrize("kind", ["cubic", "linear"])
def test_schedule_hits_exact_count_every_step_without_regrowth(kind):
    torch.manual_seed(0)
    a = nn.Parameter(torch.randn(10, 13))
    b = nn.Parameter(torch.randn(7, 3))
    opt = SparseOptimizer(
        torch.optim.Adam([a, b], lr=0.05),
        target_sparsity=0.8,
        initial_sparsity=0.1,
        schedule_steps=6,
        schedule=kind,
    )
    previous = [torch.zeros_like(a, dtype=torch.bool), torch.zeros_like(b, dtype=torch.bool)]
    for t in range(1, 10):
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
        opt.step()
        s_t = expected_sparsity(kind, 0.1, 0.8, t, 6)
        assert opt.scheduled_sparsity() == pytest.approx(s_t)
        for p, prev in zip((a, b), previous, strict=True):
            zeros = p.detach() == 0
            assert int(zeros.sum()) == round(s_t * p.numel()), (t, p.shape)
            assert bool(zeros[prev].all())  # no regrowth: once pruned, stays pruned
        previous = [a.detach() == 0, b.detach() == 0]
    assert int((a == 0).sum()) == 104 and int((b == 0).sum()) == 17  # round(0.8·n)


def test_schedule_breaks_ties_by_rank_not_threshold():
    # lr=0 keeps the weights; all magnitudes tie, so "≤ threshold" would prune everything.
    w = nn.Parameter(torch.tensor([1.0, -1.0, 1.0, -1.0, 1.0, 2.0, 1.0, -1.0, 1.0, 1.0]))
    opt = SparseOptimizer(
        torch.optim.SGD([w], lr=0.0),
        target_sparsity=0.5,
        schedule_steps=2,
        schedule="linear",
        saliency="magnitude",
    )
    w.grad = torch.zeros(10)
    opt.step()  # s_1 = 0.25 → round(2.5) = 2 zeros (half to even), the two lowest indices
    assert torch.equal(w.detach() == 0, torch.tensor([1, 1, 0, 0, 0, 0, 0, 0, 0, 0]).bool())
    opt.step()  # s_2 = 0.5 → 5 zeros
    assert torch.equal(w.detach() == 0, torch.tensor([1, 1, 1, 1, 1, 0, 0, 0, 0, 0]).bool())


@pytest.mark.parametrize("base", ["adam", "sgd"])
def test_fisher_saliency_ranks_by_w_squared_times_mean_squared_gradient(base):
    # |w| would cut entries 1 and 0; w²·E[g²] ∝ [1e-4, 25, 0.04, 9] cuts 0 and 2.
    w = nn.Parameter(torch.tensor([1.0, 0.5, 2.0, 3.0]))
    grad = torch.tensor([0.01, 10.0, 0.1, 1.0])
    inner = torch.optim.Adam([w], lr=0.0) if base == "adam" else torch.optim.SGD([w], lr=0.0)
    fisher = SparseOptimizer(inner, target_sparsity=0.5, schedule_steps=1)
    w.grad = grad.clone()
    fisher.step()
    assert torch.equal(w.detach() == 0, torch.tensor([True, False, True, False]))

    v = nn.Parameter(torch.tensor([1.0, 0.5, 2.0, 3.0]))
    magnitude = SparseOptimizer(
        torch.optim.SGD([v], lr=0.0), target_sparsity=0.5, schedule_steps=1, saliency="magnitude"
    )
    v.grad = grad.clone()
    magnitude.step()
    assert torch.equal(v.detach() == 0, torch.tensor([True, True, False, False]))


def test_own_fisher_is_an_ema_of_squared_gradients_for_non_adam_bases():
    w = nn.Parameter(torch.ones(3))
    opt = SparseOptimizer(torch.optim.SGD([w], lr=0.0), target_sparsity=0.0, schedule_steps=1)
    for g in ([1.0, 2.0, 0.0], [3.0, 0.0, 1.0]):
        w.grad = torch.tensor(g)
        opt.step()
    beta = 0.999
    expected = torch.tensor([1.0, 4.0, 0.0]) * (1 - beta) * beta + torch.tensor([9.0, 0.0, 1.0]) * (
        1 - beta
    )
    assert torch.allclose(opt._fisher[0], expected)
    # Adam keeps its own second moment: the wrapper adds no copy of it.
    a = nn.Parameter(torch.ones(3))
    adam = SparseOptimizer(torch.optim.Adam([a], lr=0.0), target_sparsity=0.0, schedule_steps=1)
    a.grad = torch.ones(3)
    adam.step()
    assert adam._fisher == [None]


def test_schedule_start_holds_the_initial_sparsity_then_ramps():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(100))
    opt = SparseOptimizer(
        torch.optim.Adam([w], lr=1e-3),
        target_sparsity=0.6,
        schedule_steps=4,
        schedule_start=3,
        schedule="linear",
    )
    counts = []
    for _ in range(9):
        w.grad = torch.randn(100)
        opt.step()
        counts.append(int((w.detach() == 0).sum()))
    assert counts == [0, 0, 0, 15, 30, 45, 60, 60, 60]
    assert opt.scheduled_sparsity(3) == 0.0 and opt.scheduled_sparsity(5) == pytest.approx(0.3)


def test_bad_arguments_are_rejected():
    w = nn.Parameter(torch.ones(3))
    with pytest.raises(ValueError, match="penalty"):
        SparseOptimizer(torch.optim.SGD([w], lr=1.0), penalty="l2")
    with pytest.raises(ValueError, match="schedule_steps"):
        SparseOptimizer(torch.optim.SGD([w], lr=1.0), target_sparsity=0.5)
    with pytest.raises(ValueError, match="lam"):
        SparseOptimizer(
            torch.optim.SGD([w], lr=1.0), target_sparsity=0.5, schedule_steps=3, lam=0.1
        )
    with pytest.raises(ValueError, match="saliency"):
        SparseOptimizer(
            torch.optim.SGD([w], lr=1.0), target_sparsity=0.5, schedule_steps=3, saliency="grad"
        )
    with pytest.raises(ValueError, match="schedule_start"):
        SparseOptimizer(
            torch.optim.SGD([w], lr=1.0), target_sparsity=0.5, schedule_steps=3, schedule_start=-1
        )
    with pytest.raises(ValueError, match="does not optimise"):
        SparseOptimizer(torch.optim.SGD([w], lr=1.0), params_to_sparsify=[nn.Parameter(w)])


# --- frozen masks --------------------------------------------------------------------------


def test_keep_mask_holds_zeros_through_adamw_with_weight_decay():
    model = small_mlp()
    prune_half([model[0].weight, model[2].weight])
    zeros = [(model[0].weight == 0).clone(), (model[2].weight == 0).clone()]
    start = [p.detach().clone() for p in model.parameters()]
    control = copy.deepcopy(model)
    opt = SparseOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        params_to_sparsify=[model[0].weight, model[2].weight],
        keep_mask=True,
    )
    control_opt = torch.optim.AdamW(control.parameters(), lr=1e-2, weight_decay=0.1)
    assert opt.sparsity() == 0.5
    for step in range(50):
        regression_step(model, opt, seed=step)
        regression_step(control, control_opt, seed=step)
        for p, mask in zip((model[0].weight, model[2].weight), zeros, strict=True):
            assert torch.equal(p.detach() == 0, mask), step
    for p, mask in zip((model[0].weight, model[2].weight), zeros, strict=True):
        assert torch.equal(opt.state[p]["exp_avg"][mask], torch.zeros(int(mask.sum())))
    # Every kept weight and the (unsparsified) biases moved.
    for p, p0 in zip(model.parameters(), start, strict=True):
        moved = p.detach() != p0
        kept = p0 != 0
        assert bool(moved[kept].all())
    # Without the wrapper AdamW does revive the zeros: the test above can fail.
    assert int((control[0].weight == 0).sum()) == 0
    assert opt.sparsity() == 0.5


def test_keep_mask_with_l1_only_adds_zeros():
    model = small_mlp()
    prune_half([model[0].weight])
    zeros = (model[0].weight == 0).clone()
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1),
        params_to_sparsify=[model[0].weight],
        keep_mask=True,
        lam=0.5,
    )
    for step in range(5):
        regression_step(model, opt, seed=step)
    now = model[0].weight.detach() == 0
    assert bool(now[zeros].all())
    assert int(now.sum()) > int(zeros.sum())  # τ = 0.05 shrank more weights to zero
    assert model[2].weight.ne(0).all()  # not sparsified


# --- parameter selection -------------------------------------------------------------------


def test_sparsifiable_parameters_pick_decoder_linear_weights_only():
    model = tiny_llama()
    names = [n for n, _ in sparsifiable_parameters(model)]
    assert decoder_layers(model) is model.model.layers
    assert len(names) == 2 * 7
    assert names[0] == "model.layers.0.self_attn.q_proj.weight"
    assert all(n.startswith("model.layers.") and n.endswith("_proj.weight") for n in names)
    assert not any("norm" in n or "embed" in n or "lm_head" in n for n in names)


def test_sparsifiable_parameters_gpt2_conv1d():
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=3, n_head=2)
    model = transformers.GPT2LMHeadModel(config)
    names = [n for n, _ in sparsifiable_parameters(model)]
    assert len(names) == 3 * 4  # c_attn, c_proj (attn), c_fc, c_proj (mlp) per block
    assert all(n.startswith("transformer.h.") for n in names)


def test_params_selection_by_callable_and_default_model():
    model = tiny_llama()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    by_default = SparseOptimizer(base, model=model)
    assert len(by_default.sparsified_parameters) == 14
    mlp_only = SparseOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-3),
        model=model,
        params_to_sparsify=lambda name, p: ".mlp." in name,
    )
    assert [n for n, _ in mlp_only.sparsified_parameters][:1] == [
        "model.layers.0.mlp.gate_proj.weight"
    ]
    assert len(mlp_only.sparsified_parameters) == 6
    with pytest.raises(ValueError, match="model="):
        SparseOptimizer(base, params_to_sparsify=lambda n, p: True)


def test_a_selection_that_cannot_work_says_what_to_pass():
    """Names where tensors belong, a filter matching nothing and a model without decoder
    blocks: one message each saying what to pass (an empty selection used to build an
    optimizer whose every step sparsified nothing)."""
    model = tiny_llama()
    base = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with pytest.raises(TypeError, match=r"got str 'model.layers.0.mlp.up_proj.weight'; .*callable"):
        SparseOptimizer(base, model=model, params_to_sparsify=["model.layers.0.mlp.up_proj.weight"])
    with pytest.raises(ValueError, match="selects no tensor"):
        SparseOptimizer(base, model=model, params_to_sparsify=lambda name, p: "nothing" in name)
    mlp = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    with pytest.raises(ValueError, match="no nn.ModuleList of blocks; pass params_to_sparsify="):
        SparseOptimizer(torch.optim.SGD(mlp.parameters(), lr=0.1), model=mlp, lam=0.1)
    chosen = SparseOptimizer(
        torch.optim.SGD(mlp.parameters(), lr=0.1), model=mlp, params_to_sparsify=[mlp[0].weight]
    )
    assert [n for n, _ in chosen.sparsified_parameters] == ["0.weight"]


# --- checkpointing ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["schedule", "schedule_sgd", "keep_mask_l1"])
def test_state_dict_round_trip(mode):
    def build(model):
        if mode == "schedule_sgd":
            base = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
        else:
            base = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.05)
        sparse = [model[0].weight, model[2].weight]
        if mode.startswith("schedule"):
            opt = SparseOptimizer(
                base, params_to_sparsify=sparse, target_sparsity=0.7, schedule_steps=6
            )
        else:
            opt = SparseOptimizer(base, params_to_sparsify=sparse, keep_mask=True, lam=1e-3)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.8**s)
        return opt, sched

    first = small_mlp()
    if mode == "keep_mask_l1":
        prune_half([first[0].weight])
    opt, sched = build(first)
    for step in range(3):
        regression_step(first, opt, seed=step)
        sched.step()
    buffer = io.BytesIO()
    torch.save(
        {"model": first.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["opt"]["sparse_optimizer"]["step"] == 3
    assert len(saved["opt"]["sparse_optimizer"]["fisher"]) == (2 if mode == "schedule_sgd" else 0)

    second = small_mlp(seed=1)
    second.load_state_dict(saved["model"])
    opt2, sched2 = build(second)
    sched2.load_state_dict(saved["sched"])
    opt2.load_state_dict(saved["opt"])
    assert opt2.sparse_step == 3
    for step in range(3, 8):
        regression_step(first, opt, seed=step)
        sched.step()
        regression_step(second, opt2, seed=step)
        sched2.step()
    for a, b in zip(first.parameters(), second.parameters(), strict=True):
        assert torch.equal(a, b)
    if mode.startswith("schedule"):
        assert int((second[0].weight == 0).sum()) == round(0.7 * 128)


def test_load_state_dict_rejects_other_selection():
    model = small_mlp()
    opt = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), params_to_sparsify=[model[0].weight]
    )
    other = SparseOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1), params_to_sparsify=[model[2].weight]
    )
    with pytest.raises(ValueError, match="other parameters"):
        other.load_state_dict(opt.state_dict())


def test_deepcopy_is_independent_after_scheduler_patched_step():
    model = small_mlp()
    opt = SparseOptimizer(torch.optim.AdamW(model.parameters(), lr=0.1), lam=0.1)
    torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)  # patches opt.step per instance
    regression_step(model, opt, seed=0)
    copies = copy.deepcopy({"model": model, "opt": opt})
    regression_step(copies["model"], copies["opt"], seed=1)
    assert (opt.sparse_step, copies["opt"].sparse_step) == (1, 2)
    assert copies["opt"].param_groups[0]["params"][0] is copies["model"][0].weight
    assert not torch.equal(model[0].weight, copies["model"][0].weight)


# --- schedulers, GradScaler, hooks ---------------------------------------------------------


def test_tau_follows_lr_scheduler():
    w = nn.Parameter(torch.ones(4))
    opt = SparseOptimizer(torch.optim.SGD([w], lr=1.0), penalty="l1", lam=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5**s)
    expected = 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(4):
            w.grad = torch.zeros(4)
            opt.step()
            sched.step()
            expected -= 0.1 * 0.5**step
            torch.testing.assert_close(w.detach(), torch.full((4,), expected))
    assert opt.param_groups is opt.base_optimizer.param_groups
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.5**4)


def test_transformers_scheduler_and_step_hooks():
    transformers = pytest.importorskip("transformers")
    w = nn.Parameter(torch.ones(3))
    opt = SparseOptimizer(torch.optim.AdamW([w], lr=1e-3), lam=0.0)
    sched = transformers.get_linear_schedule_with_warmup(opt, 2, 10)
    calls = []
    opt.register_step_post_hook(lambda o, args, kwargs: calls.append(o.sparse_step))
    for _ in range(3):
        w.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert calls == [1, 2, 3]
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 7 / 8)


def test_grad_scaler_on_cpu():
    try:
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    except Exception as exc:  # pragma: no cover - depends on the torch build
        pytest.skip(f"GradScaler('cpu') unavailable: {exc}")
    scaled_model, plain_model = small_mlp(), small_mlp()
    scaled = SparseOptimizer(torch.optim.SGD(scaled_model.parameters(), lr=0.1), lam=0.3)
    plain = SparseOptimizer(torch.optim.SGD(plain_model.parameters(), lr=0.1), lam=0.3)
    x, y = torch.randn(16, 8), torch.randn(16, 4)
    for _ in range(3):
        scaled.zero_grad()
        scaler.scale(nn.functional.mse_loss(scaled_model(x), y)).backward()
        scaler.step(scaled)
        scaler.update()
        regression_free = nn.functional.mse_loss(plain_model(x), y)
        plain.zero_grad()
        regression_free.backward()
        plain.step()
    for a, b in zip(scaled_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # power-of-two scaling cancels exactly up to rounding
    # An overflow step is skipped whole: no base update, no prox, no step count.
    before = [p.detach().clone() for p in scaled_model.parameters()]
    scaled.zero_grad()
    scaler.scale(nn.functional.mse_loss(scaled_model(x), y)).backward()
    scaled_model[0].weight.grad[0, 0] = float("inf")
    scaler.step(scaled)
    scaler.update()
    assert scaled.sparse_step == 3
    for p, p0 in zip(scaled_model.parameters(), before, strict=True):
        assert torch.equal(p, p0)


# --- transformers.Trainer --------------------------------------------------------------------


class _Windows(torch.utils.data.Dataset):
    def __init__(self, ids: torch.Tensor) -> None:
        self.ids = ids

    def __len__(self) -> int:
        return self.ids.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_keeps_zeros(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny_llama()
    selected = sparsifiable_parameters(model)
    prune_half([p for _, p in selected])
    zeros = {n: (p == 0).clone() for n, p in selected}
    before = {n: p.detach().clone() for n, p in selected}
    opt = SparseOptimizer(
        torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1),
        model=model,
        keep_mask=True,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        max_grad_norm=1.0,
    )
    gen = torch.Generator().manual_seed(0)
    data = _Windows(torch.randint(0, 128, (8, 12), generator=gen))
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=data, optimizers=(opt, sched)
    )
    result = trainer.train()
    assert trainer.state.global_step == 3
    assert opt.sparse_step == 3
    assert math.isfinite(result.training_loss)
    assert opt.sparsity() == 0.5
    for name, p in selected:
        assert torch.equal(p.detach() == 0, zeros[name]), name
        kept = ~zeros[name]
        assert bool((p.detach()[kept] != before[name][kept]).all()), name
