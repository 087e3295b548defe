"""The generator over every order × Token-Shuffle window × conditioning: causality through the model,
KV cache == full recomputation, steps per image, CFG equivalences, loss bookkeeping; NAR's heads and
VAR's inputs."""

from __future__ import annotations

import pytest
import torch

from arlab.backbone.llama import Llama
from arlab.conditioner.label import ClassConditioner
from arlab.conditioner.text import TextConditioner
from arlab.config import build
from arlab.errors import ConfigError
from arlab.generator.model import Generator
from arlab.generator.sampling import CFG_SCHEDULES
from arlab.quantizer.msvq import MultiScaleVQ
from arlab.registry import get, names
from arlab.shuffle.window import TokenShuffle

GRID = (8, 8)
V = 37
# msvq scales per Token-Shuffle window (every scale divisible by s, the first one fusing to one cell)
PATCH = {1: [1, 2, 3, 4, 6, 8], 2: [2, 4, 6, 8], 4: [4, 8]}


def is_multiscale(order: str) -> bool:
    return bool(get("order", order).cls.multiscale)


def make(order: str = "raster", s: int = 1, cond_mode: str = "prefix", seed: int = 0, cond: str = "class",
         depth: int = 2) -> Generator:
    torch.manual_seed(seed)
    bb = Llama(Llama.Config(dim=64, depth=depth, heads=4, multiple_of=32, cond_mode=cond_mode, qk_norm=True))
    scales, quant = GRID, None
    if is_multiscale(order):
        pn = PATCH[s]
        quant = MultiScaleVQ(MultiScaleVQ.Config(codebook_size=V, code_dim=8, patch_nums=pn, latent_size=8,
                                                 phi_k=min(4, len(pn))))
        with torch.no_grad():
            quant.embedding.weight.normal_()
        scales = [(p, p) for p in pn]
    conditioner = (ClassConditioner(ClassConditioner.Config(), 64, num_classes=10) if cond == "class"
                   else TextConditioner(TextConditioner.Config(max_bytes=12), 64))
    g = Generator(bb, build("order", order), TokenShuffle(TokenShuffle.Config(s=s), 64), conditioner, V, scales,
                  quantizer=quant).eval()
    with torch.no_grad():  # leave the zero / identity inits so every path carries signal
        for m in g.modules():
            if isinstance(m, torch.nn.Linear) and m is not getattr(quant, "phis", None):
                torch.nn.init.normal_(m.weight, std=0.3)
    return g


def conditions(g: Generator, n: int) -> torch.Tensor:
    if isinstance(g.conditioner, TextConditioner):
        return g.conditioner.encode(["a red ring", "", "a large blue square!", "x"][:n] + ["ok"] * max(0, n - 4))
    return torch.tensor([1, 7, 4, 0, 9][:n])


def random_codes(g: Generator, b: int) -> torch.Tensor:
    return torch.randint(0, V, (b, g.layout.num_tokens))


CASES = [(o, s) for o in names("order") for s in (1, 2, 4)]


def assert_causal(g: Generator, codes: torch.Tensor, cond: torch.Tensor, vocab: int) -> None:
    """A target's logits depend only on tokens emitted at earlier decoding steps, and changing a token is seen at
    later steps (checked at the first, second, middle and last two slots). Shared with the backbone contract."""
    plan, lay = g.plan, g.layout
    with torch.no_grad():
        base = lay.windows(g(codes, cond).logits_bnv)  # (B, cells, s², V)
    step = plan.step_of_slot()
    step_of_cell = step[torch.argsort(plan.perm)]
    for t in sorted({0, 1, plan.length // 2, plan.length - 2, plan.length - 1}):
        cell = int(plan.perm[t])
        changed = codes.clone()
        changed[:, lay.win_index[cell]] = (changed[:, lay.win_index[cell]] + 1) % vocab
        with torch.no_grad():
            new = lay.windows(g(changed, cond).logits_bnv)
        earlier, later = step_of_cell <= step[t], step_of_cell > step[t]
        assert torch.allclose(new[:, earlier], base[:, earlier], atol=1e-5), t
        if bool(later.any()):  # (the last step, e.g. VAR's last scale, has no later step)
            assert not torch.allclose(new[:, later], base[:, later], atol=1e-4), t


@pytest.mark.parametrize("order,s", CASES)
def test_changing_a_later_token_leaves_earlier_logits_unchanged(order, s):
    """A target's logits depend only on tokens emitted at earlier steps (raster: earlier tokens; next_scale:
    earlier scales; neighbor: smaller Manhattan distance), and the change is seen at later steps."""
    g = make(order, s)
    assert_causal(g, random_codes(g, 2), conditions(g, 2), V)


@pytest.mark.parametrize("order,s", CASES)
@pytest.mark.parametrize("cond_mode", ["prefix", "adaln"])
def test_kv_cached_decoding_gives_the_full_recomputation_logits(order, s, cond_mode):
    g = make(order, s, cond_mode)
    cond = conditions(g, 3)
    for cfg in (1.0, 3.0):
        gen = torch.Generator().manual_seed(5)
        codes, logits = g.sample(cond, cfg_scale=cfg, cfg_schedule="half-linear", generator=gen, return_logits=True)
        gen = torch.Generator().manual_seed(5)
        codes_ref, logits_ref = g.sample(cond, cfg_scale=cfg, cfg_schedule="half-linear", generator=gen,
                                         return_logits=True, use_cache=False)
        tol = 1e-5 * float(logits_ref.abs().max())  # logits reach ~70 with these weights
        assert torch.allclose(logits, logits_ref, atol=tol), (logits - logits_ref).abs().max()
        assert torch.equal(codes, codes_ref)
        if cfg == 1.0:  # and both equal the teacher-forced forward on the sampled tokens
            assert torch.allclose(g(codes, cond).logits_bnv, logits.flatten(1, -2), atol=tol)


@pytest.mark.parametrize("order", names("order"))
def test_kv_cached_decoding_with_a_padded_text_prefix(order):
    g = make(order, 2, cond="text")
    cond = conditions(g, 4)  # captions of different lengths: different padding per row
    gen = torch.Generator().manual_seed(2)
    codes, logits = g.sample(cond, cfg_scale=2.5, generator=gen, return_logits=True)
    gen = torch.Generator().manual_seed(2)
    codes_ref, logits_ref = g.sample(cond, cfg_scale=2.5, generator=gen, return_logits=True, use_cache=False)
    assert torch.allclose(logits, logits_ref, atol=1e-5 * float(logits_ref.abs().max()))
    assert torch.equal(codes, codes_ref)


def test_padding_keys_are_invisible():
    g = make("raster", 2, cond="text")
    cond = conditions(g, 3)
    codes = random_codes(g, 3)
    base = g(codes, cond).logits_bnv
    with torch.no_grad():
        g.conditioner.embedding.weight[256].normal_(std=5.0)  # the PAD embedding
    assert torch.allclose(g(codes, cond).logits_bnv, base, atol=1e-5)
    with torch.no_grad():
        g.conditioner.embedding.weight[ord("a")].normal_(std=5.0)  # a byte of the captions: seen
    assert not torch.allclose(g(codes, cond).logits_bnv, base, atol=1e-4)


@pytest.mark.parametrize("order,s,steps", [("raster", 1, 64), ("raster", 2, 16), ("raster", 4, 4),
                                           ("neighbor", 1, 15), ("neighbor", 2, 7), ("neighbor", 4, 3),
                                           ("next_scale", 1, 6), ("next_scale", 2, 4), ("next_scale", 4, 2)])
def test_steps_per_image(order, s, steps):
    g = make(order, s)
    assert g.steps_per_image == steps
    if order == "neighbor":
        h, w = g.layout.fused[0]
        assert steps == h + w - 1
    if order == "next_scale":
        assert steps == len(g.layout.scales)


def test_neighbor_logits_average_the_right_and_lower_heads():
    """NAR's rule on the model itself: target (r, c) = mean(head_R(hidden of (r, c−1)), head_B(hidden of (r−1, c)));
    row 0 uses head_R only, column 0 head_B only, the top-left token both heads at the condition token."""
    g = make("neighbor", 1)
    plan = g.plan
    h, w = GRID
    seen = {}
    g.head.register_forward_hook(lambda m, i, o: seen.__setitem__("R", o[:, :, 0]))
    g.head2.register_forward_hook(lambda m, i, o: seen.__setitem__("B", o[:, :, 0]))
    codes = random_codes(g, 2)
    logits = g(codes, conditions(g, 2)).logits_bhwv
    R, B = seen["R"], seen["B"]  # (B, L, V) by input slot: slot 0 = condition, slot j = the token of in_cells[j]

    def hidden_slot(r, c):
        return int((plan.in_cells == r * w + c).nonzero())

    for r in range(h):
        for c in range(w):
            if r == 0 and c == 0:
                want = (R[:, 0] + B[:, 0]) / 2
            elif r == 0:
                want = R[:, hidden_slot(0, c - 1)]
            elif c == 0:
                want = B[:, hidden_slot(r - 1, 0)]
            else:
                want = (R[:, hidden_slot(r, c - 1)] + B[:, hidden_slot(r - 1, c)]) / 2
            assert torch.allclose(logits[:, r, c], want, atol=1e-5), (r, c)


@pytest.mark.parametrize("s", [1, 2])
def test_neighbor_mask_is_the_proximity_mask(s):
    g = make("neighbor", s)
    plan = g.plan
    hf, wf = g.layout.fused[0]
    cells = plan.in_cells
    dist = torch.where(cells >= 0, cells // wf + cells % wf, -1)  # the condition token: distance -1
    want = dist[None, :] <= dist[:, None]
    want[:, 0] = True
    assert torch.equal(plan.mask, want)
    full = g.train_mask  # with the prefix: every image input sees the condition
    assert bool(full[g.prefix_len - 1:, : g.prefix_len].all())


def test_next_scale_inputs_are_the_tokenizers_teacher_forcing_inputs():
    g = make("next_scale", 1)
    q, order = g.order.quant, g.order
    codes = random_codes(g, 2)
    maps, off = [], 0
    for p in PATCH[1]:
        maps.append(codes[:, off:off + p * p].view(2, p, p))
        off += p * p
    tf = q.teacher_forcing_inputs(maps)  # the tokenizer's own (B, N - 1, C)
    seen = {}
    g.backbone.register_forward_pre_hook(lambda m, args, kw: seen.__setitem__("seq", args[0]), with_kwargs=True)
    g(codes, conditions(g, 2))
    want = order.word_embed(tf) + order.input_bias()[1:]
    assert torch.allclose(seen["seq"][:, g.prefix_len:], want, atol=1e-6)
    start = g.conditioner.embedding(conditions(g, 2)) + order.input_bias()[0]  # VAR's start token
    assert torch.allclose(seen["seq"][:, g.prefix_len - 1], start, atol=1e-6)
    assert torch.equal(order.tf_features(codes), tf)


def test_next_scale_sampling_rebuilds_fhat_like_the_tokenizer():
    g = make("next_scale", 1)
    q, order = g.order.quant, g.order
    codes = g.sample(conditions(g, 3), cfg_scale=2.0, cfg_schedule="var", generator=torch.Generator().manual_seed(0))
    state = order.start_sampling()
    for k in range(1, len(PATCH[1])):  # the sampler's own path, scale by scale
        order.step_inputs(state, k, codes)
    f_hat, _ = order.add_scale(state["f_hat"], len(PATCH[1]) - 1, codes)
    maps, off = [], 0
    for p in PATCH[1]:
        maps.append(codes[:, off:off + p * p].view(3, p, p))
        off += p * p
    assert torch.equal(f_hat, q.decode_indices(maps))


def test_var_cfg_ramp():
    from arlab.generator.sampling import cfg_weight, is_guided

    assert [cfg_weight("var", 1.5, k, 6) for k in range(6)] == [1 + 1.5 * k / 5 for k in range(6)]
    assert is_guided("var", 1.0) and not is_guided("var", 0.0) and not is_guided("linear", 1.0)


def test_next_scale_and_token_shuffle_config_errors():
    bb = Llama(Llama.Config(dim=64, depth=1, heads=4, multiple_of=32))
    cond = ClassConditioner(ClassConditioner.Config(), 64, 10)
    q = MultiScaleVQ(MultiScaleVQ.Config(codebook_size=V, code_dim=8, patch_nums=[1, 2, 3, 4, 6, 8], latent_size=8))
    scales = [(p, p) for p in [1, 2, 3, 4, 6, 8]]
    with pytest.raises(ConfigError, match=r"s=2 needs every scale divisible by 2; 1x1, 3x3 are not"):
        Generator(bb, build("order", "next_scale"), TokenShuffle(TokenShuffle.Config(s=2), 64), cond, V, scales,
                  quantizer=q)
    with pytest.raises(ConfigError, match="needs the tokenizer's multi-scale quantizer"):
        Generator(bb, build("order", "next_scale"), TokenShuffle(TokenShuffle.Config(s=1), 64), cond, V, scales)
    with pytest.raises(ConfigError, match="walks one token grid, but the tokenizer is multi-scale"):
        Generator(bb, build("order", "raster"), TokenShuffle(TokenShuffle.Config(s=1), 64), cond, V, scales)
    with pytest.raises(ConfigError, match="needs a multi-scale tokenizer"):
        Generator(bb, build("order", "next_scale"), TokenShuffle(TokenShuffle.Config(s=1), 64), cond, V, (8, 8),
                  quantizer=q)
    q2 = MultiScaleVQ(MultiScaleVQ.Config(codebook_size=V, code_dim=8, patch_nums=[2, 4, 8], latent_size=8, phi_k=3))
    with pytest.raises(ConfigError, match="must be one cell"):
        Generator(bb, build("order", "next_scale"), TokenShuffle(TokenShuffle.Config(s=1), 64), cond, V,
                  [(2, 2), (4, 4), (8, 8)], quantizer=q2)


@pytest.mark.parametrize("schedule", CFG_SCHEDULES)
@pytest.mark.parametrize("cond", ["class", "text"])
def test_cfg_scale_one_equals_plain_conditional_sampling_for_every_schedule(schedule, cond):
    g = make("raster", 2, cond=cond)
    c = conditions(g, 3)
    one = 0.0 if schedule == "var" else 1.0  # VAR's parametrisation: guidance 1 + w·t
    a, la = g.sample(c, cfg_scale=one, cfg_schedule=schedule, generator=torch.Generator().manual_seed(1),
                     return_logits=True)
    b, lb = g.sample(c, generator=torch.Generator().manual_seed(1), return_logits=True)
    assert torch.equal(a, b) and torch.equal(la, lb)
    _, lg = g.sample(c, cfg_scale=3.0, cfg_schedule=schedule, generator=torch.Generator().manual_seed(1),
                     temperature=0, return_logits=True)
    assert not torch.allclose(lg, lb)  # guidance changes the logits


def test_cfg_uses_the_null_class_and_changes_the_samples():
    g = make("raster", 2)
    labels = torch.tensor([3, 3, 8])
    _, lc = g.sample(labels, generator=torch.Generator().manual_seed(1), temperature=0, return_logits=True)
    _, lg = g.sample(labels, cfg_scale=4.0, generator=torch.Generator().manual_seed(1), temperature=0,
                     return_logits=True)
    assert not torch.allclose(lc, lg)


def test_sampling_is_deterministic_for_a_seed():
    g = make("raster", 2)
    labels = torch.arange(4)
    a = g.sample(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(3), top_k=10)
    b = g.sample(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(3), top_k=10)
    c = g.sample(labels, cfg_scale=2.0, generator=torch.Generator().manual_seed(4), top_k=10)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_loss_is_ce_over_every_original_token_and_per_window_position():
    g = make("raster", 2)
    codes = torch.randint(0, V, (2, *GRID))
    out = g(codes, torch.tensor([0, 1]))
    ce = torch.nn.functional.cross_entropy(out.logits_bhwv.reshape(-1, V), codes.reshape(-1))
    assert torch.allclose(out.ce, ce, atol=1e-6) and torch.allclose(out.loss, ce)
    assert out.ce_per_window_pos.shape == (4,)
    assert torch.allclose(out.ce_per_window_pos.mean(), ce, atol=1e-5)
    g.z_loss_weight = 1e-2
    out2 = g(codes, torch.tensor([0, 1]))
    assert torch.allclose(out2.loss, out2.ce + 1e-2 * out2.z_loss) and out2.z_loss > 0


def test_bad_inputs():
    with pytest.raises(ConfigError, match="s=4 needs every token grid divisible by 4; 6x6 is not"):
        bb = Llama(Llama.Config(dim=64, depth=1, heads=4, multiple_of=32))
        Generator(bb, build("order", "raster"), TokenShuffle(TokenShuffle.Config(s=4), 64),
                  ClassConditioner(ClassConditioner.Config(), 64, 10), V, (6, 6))
    g = make()
    with pytest.raises(ValueError, match=r"class labels \[11\] are outside 0..9"):
        g.sample(torch.tensor([1, 11]))
    with pytest.raises(ConfigError, match="CFG schedule 'ramp' does not exist"):
        g.sample(torch.tensor([1]), cfg_schedule="ramp")
