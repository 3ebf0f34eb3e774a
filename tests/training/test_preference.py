"""training/preference.py: every ReprPO loss variant against a hand computation (plain-Python loops written from
the source's code), the retain schedules, the DPO terms, the source's pair tokenisation, pair formats, CIs."""

from __future__ import annotations

import math

import pytest
import torch

from llmrepro.core.errors import UserError
from llmrepro.training import preference as P

B, L, T, H = 3, 2, 4, 200  # H = 200 so that the top-0.5 % keeps k = int(0.005 * 200) + 1 = 2 values
MASK_C = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
MASK_R = [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]  # row 2: position 3 padded in both rows
LOGITS = [0.01, -0.02, 0.03]


def _tensors():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc = (torch.randn(B, L, T, H, generator=g, dtype=torch.float64) for _ in range(3))
    return pc, pr, rc


def _hs():
    pc, pr, rc = _tensors()
    w = P.batch_weight(torch.tensor(LOGITS, dtype=torch.float64))
    return P.HiddenStates(pc, pr, rc, torch.tensor(MASK_C, dtype=torch.float64),
                          torch.tensor(MASK_R, dtype=torch.float64), w)


# ------------------------------------------------------------------------------------- the hand computation

def _lists():
    pc, pr, rc = (x.tolist() for x in _tensors())
    e = [math.exp(-30 * x) for x in LOGITS]
    w = [v / sum(e) for v in e]
    return pc, pr, rc, w


def _pm(x, mask):  # x[b][j][t][h] * mask[b][t]
    return [[[[v * mask[b][t] for v in x[b][j][t]] for t in range(T)] for j in range(L)] for b in range(B)]


def _norm(v):
    return math.sqrt(sum(a * a for a in v))


def _dist(x, y):
    return _norm([a - b for a, b in zip(x, y, strict=True)])


def _cos(x, y):
    nx, ny = _norm(x), _norm(y)
    return 0.0 if nx == 0 or ny == 0 else sum(a * b for a, b in zip(x, y, strict=True)) / (nx * ny)


def _per(f, x, y):  # f over the hidden dim for every (b, j, t) -> [b][j][t]
    return [[[f(x[b][j][t], y[b][j][t]) for t in range(T)] for j in range(L)] for b in range(B)]


def _mean_all(v):
    flat = [a for b in v for j in b for a in j]
    return sum(flat) / len(flat)


def _wmean_b(v, w):  # v[b][...] -> weighted mean over b, elementwise
    def rec(items):
        if isinstance(items[0], list):
            return [rec([it[i] for it in items]) for i in range(len(items[0]))]
        return sum(wb * x for wb, x in zip(w, items, strict=True)) / sum(w)
    return rec(v)


def _shift(w):
    return [x - min(w) + 0.1 for x in w]


def _flat(v):
    return [a for x in v for a in (_flat(x) if isinstance(x, list) else [x])]


def _topk_sq(x, y, k=2):
    return sum(sorted(((a - b) ** 2 for a, b in zip(x, y, strict=True)), reverse=True)[:k]) / k


def _centred_sim(x, y):
    mx, my = sum(x) / len(x), sum(y) / len(y)
    xc, yc = [a - mx for a in x], [b - my for b in y]
    return sum(a * b for a, b in zip(xc, yc, strict=True)) / (_norm(xc) * _norm(yc) + 1e-8)


def hand_mse(pc, pr, rc, w):
    pc, pr, rc = _pm(pc, MASK_C), _pm(pr, MASK_R), _pm(rc, MASK_C)
    return _mean_all(_per(_dist, pr, rc)), _mean_all(_per(_dist, pc, rc))


def hand_direction(pc, pr, rc, w):
    pc, pr, rc = _pm(pc, MASK_C), _pm(pr, MASK_R), _pm(rc, MASK_C)
    rr = _mean_all(_per(lambda a, b: 1 - _cos(a, b), pr, rc))
    mag = _mean_all(_per(lambda a, b: abs(_norm(a) - _norm(b)), pc, rc))
    return rr, _mean_all(_per(lambda a, b: 1 - _cos(a, b), pc, rc)) + mag


def hand_topk(pc, pr, rc, w):
    pc, pr, rc = _pm(pc, MASK_C), _pm(pr, MASK_R), _pm(rc, MASK_C)
    rr = _flat(_wmean_b(_per(_topk_sq, pr, rc), _shift([1 - x for x in w])))  # [j][t] -> mean
    sq = [[[[(a - b) ** 2 for a, b in zip(pc[i][j][t], rc[i][j][t], strict=True)] for t in range(T)]
           for j in range(L)] for i in range(B)]
    retain = _flat(_wmean_b(sq, _shift(w)))
    return sum(rr) / len(rr), sum(retain) / len(retain)


def hand_rr_only(pc, pr, rc, w):
    return hand_mse(pc, pr, rc, w)[0], None


def hand_cka(pc, pr, rc, w):
    pc, pr, rc = _pm(pc, MASK_C), _pm(pr, MASK_R), _pm(rc, MASK_C)
    return _mean_all(_per(_centred_sim, pr, rc)), _mean_all(_per(_centred_sim, pc, rc))


def hand_topk_rr(pc, pr, rc, w):
    pr, rc = _pm(pr, MASK_R), _pm(rc, MASK_C)
    rr = _flat(_wmean_b(_per(_topk_sq, pr, rc), [1 - x for x in w]))
    return sum(rr) / len(rr), None


def hand_direction_tokens(pc, pr, rc, w):
    pc, pr, rc = _pm(pc, MASK_C), _pm(pr, MASK_R), _pm(rc, MASK_C)
    rr = sum(_flat(_wmean_b(_per(lambda a, b: 1 - _cos(a, b), pr, rc), [1 - x for x in w])))
    mag = _mean_all(_per(lambda a, b: abs(_norm(a) - _norm(b)), pc, rc))
    retain = sum(_flat(_wmean_b(_per(lambda a, b: 1 - _cos(a, b) + mag, pc, rc), w)))
    return rr / (L * sum(_flat(MASK_R))), retain / (L * sum(_flat(MASK_C)))


def hand_norm_smooth_l1(pc, pr, rc, w):
    pr, rc = _pm(pr, MASK_R), _pm(rc, MASK_C)

    def centred_norm(v):
        m = sum(v) / len(v)
        return _norm([a - m for a in v])

    def smooth(a, b):
        d = abs(centred_norm(a) - centred_norm(b))
        return 0.5 * d * d if d < 1 else d - 0.5

    return _mean_all(_per(smooth, pr, rc)), None


def hand_regular(pc, pr, rc, w):
    pc, pr, rc = _pm(pc, MASK_C), _pm(pr, MASK_R), _pm(rc, MASK_C)
    rr = sum(_flat(_wmean_b(_per(_dist, _pm(pr, MASK_R), _pm(rc, MASK_R)), [1 - x for x in w])))
    retain = sum(_flat(_wmean_b(_per(_dist, _pm(pc, MASK_C), _pm(rc, MASK_C)), w)))
    return rr / (L * sum(_flat(MASK_R))), retain / (L * sum(_flat(MASK_C)))


def _token_mean(v, mask):  # v[b][j][t] -> [b][j], mean over the positions where mask is 1
    return [[sum(v[b][j][t] * mask[b][t] for t in range(T)) / sum(mask[b]) for j in range(L)] for b in range(B)]


def hand_regular_final(pc, pr, rc, w):  # no pre-masking (74002da on)
    both = [[a * b for a, b in zip(mc, mr, strict=True)] for mc, mr in zip(MASK_C, MASK_R, strict=True)]
    rr = _wmean_b(_token_mean(_per(_dist, pr, rc), both), [1 - x for x in w])
    retain = _wmean_b(_token_mean(_per(_dist, pc, rc), MASK_C), w)
    return sum(rr) / L, sum(retain) / L


def hand_symlog(pc, pr, rc, w):
    s = lambda x: math.copysign(1, x) * math.log(abs(x) + 1e-6) if x != 0 else 0.0  # noqa: E731
    both = [[a * b for a, b in zip(mc, mr, strict=True)] for mc, mr in zip(MASK_C, MASK_R, strict=True)]

    def term(x, y, mask):
        vals = []
        for b in range(B):
            for j in range(L):
                for h in range(H):
                    num = sum((s(x[b][j][t][h]) - s(y[b][j][t][h])) ** 2 * mask[b][t] for t in range(T))
                    vals.append(num / sum(mask[b]))
        return sum(vals) / len(vals)

    return term(pr, rc, both), term(pc, rc, MASK_C)


HAND = {"mse": hand_mse, "direction": hand_direction, "topk": hand_topk, "rr-only": hand_rr_only, "cka": hand_cka,
        "topk-rr": hand_topk_rr, "direction-tokens": hand_direction_tokens, "norm-smooth-l1": hand_norm_smooth_l1,
        "regular": hand_regular, "regular-final": hand_regular_final, "symlog": hand_symlog}


def test_every_variant_has_a_hand_computation():
    assert set(HAND) == set(P.REPR_LOSSES)


@pytest.mark.parametrize("name", sorted(P.REPR_LOSSES))
def test_variant_equals_hand_computation(name):
    rr, retain = P.REPR_LOSSES[name](_hs())
    want_rr, want_retain = HAND[name](*_lists())
    assert rr.dim() == 0 and float(rr) == pytest.approx(want_rr, rel=1e-5)
    if want_retain is None:
        assert retain is None
    else:
        assert retain.dim() == 0 and float(retain) == pytest.approx(want_retain, rel=1e-5)


@pytest.mark.parametrize("name", sorted(P.REPR_LOSSES))
def test_variant_has_gradient_to_the_policy_only(name):
    hs = _hs()
    hs.policy_chosen.requires_grad_(True)
    hs.policy_rejected.requires_grad_(True)
    rr, retain = P.REPR_LOSSES[name](hs)
    P.combine(rr, retain, 0.3, 2.0).backward()
    assert hs.policy_rejected.grad is not None and hs.policy_rejected.grad.abs().sum() > 0
    assert hs.ref_chosen.grad is None


def test_combine_and_weights():
    rr, retain = torch.tensor(2.0), torch.tensor(5.0)
    assert float(P.combine(rr, retain, 0.25, 0.1)) == pytest.approx(0.75 * 2 + 0.1 * 0.25 * 5)
    assert P.combine(rr, None, 0.25, 0.1) is rr  # rr-only variants skip the schedule
    w = P.batch_weight(torch.zeros(4))
    assert w.tolist() == [0.25] * 4  # at init (policy == reference) every pair weighs 1/B, as logged in the source
    assert not w.requires_grad


def test_schedules():
    # 07-14/15 runs: c = (step + 1) / (2 * rows), rows = 2250, so step 149 gives 150/4500
    assert P.schedule_rows(149, 150, 2250) == pytest.approx(150 / 4500)
    assert P.schedule_rows(0, 150, 2250) == pytest.approx(1 / 4500)
    # 00a471c get_coeff: (step / steps) % 1 / 2
    assert P.schedule_progress(0, 150, 2250) == 0
    assert P.schedule_progress(75, 150, 2250) == pytest.approx(0.25)
    assert P.schedule_progress(150, 150, 2250) == 0  # the source's % 1 wraps at the end
    assert set(P.SCHEDULES) == {"rows", "progress"}


def test_sequence_logps_sum_and_per_token_mean():
    tok = torch.tensor([[-1.0, -2.0, 0.0], [-0.5, 0.0, 0.0]])  # zero off the completion (fused head output)
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]])  # completion mask (N, T); tok is (N, T-1)
    assert P.sequence_logps(tok, mask, "sum").tolist() == [-3.0, -0.5]
    assert P.sequence_logps(tok, mask, "mean").tolist() == [-1.5, -0.5]


def test_dpo_loss_by_hand():
    pc, pr, rc, rr = torch.tensor([-3.0, -1.0]), torch.tensor([-4.0, -2.5]), torch.tensor([-3.5, -1.0]), \
        torch.tensor([-3.5, -2.0])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0], [0, 1, 1], [0, 1, 1]])  # chosen rows first
    delta = [(-3 + 3.5) - (-4 + 3.5), (-1 + 1) - (-2.5 + 2)]
    sig = sum(-math.log(1 / (1 + math.exp(-0.1 * d))) for d in delta) / 2
    assert float(P.dpo_loss(pc, pr, rc, rr, mask, 0.1, "sigmoid")) == pytest.approx(sig)
    ipo_delta = [0.5 / 2 - (-0.5) / 2, 0 / 1 - (-0.5) / 2]  # per completion token, chosen and rejected counts
    ipo = sum((d - 1 / (2 * 0.1)) ** 2 for d in ipo_delta) / 2
    assert float(P.dpo_loss(pc, pr, rc, rr, mask, 0.1, "ipo")) == pytest.approx(ipo)
    with pytest.raises(ValueError, match="unknown DPO loss type"):
        P.dpo_loss(pc, pr, rc, rr, mask, 0.1, "hinge")


# ---------------------------------------------------------------------------------------------- pair data


def test_pair_formats():
    from llmrepro.lm import fixtures

    hs2 = fixtures.rows("helpsteer2-dpo-pairs")[0]
    assert P.to_pair(hs2, "helpsteer2-dpo") == {"prompt": hs2["prompt"], "chosen": hs2["chosen_response"],
                                                "rejected": hs2["rejected_response"]}
    col = fixtures.rows("dpo-helpsteer")[0]
    assert P.to_pair(col, "dpo-helpsteer")["chosen"] == col["chosen"][1]["content"]  # the assistant turn
    for row in fixtures.rows("truthful-qa-binary")[:2]:
        pair = P.to_pair(row, "binary-choice")
        assert pair["chosen"] == row["choices"][row["label"]] and pair["rejected"] == row["choices"][1 - row["label"]]
    with pytest.raises(UserError, match="not preference data"):
        P.to_pair(hs2, "dolly")


def test_load_pairs_shuffles_as_datasets_did_and_subsamples():
    import numpy as np

    from llmrepro.lm import fixtures

    rows = fixtures.rows("helpsteer2-dpo-pairs")
    spec = P.PairData(data={"name": "fixture:helpsteer2-dpo-pairs", "format": "helpsteer2-dpo"}, samples=5)
    order = np.random.default_rng(42).permutation(len(rows))[:5]  # datasets' shuffle(seed=42) then select(range(5))
    assert [p["prompt"] for p in P.load_pairs(spec)] == [rows[i]["prompt"] for i in order]
    spec = P.PairData(data={"name": "fixture:helpsteer2-dpo-pairs", "format": "helpsteer2-dpo"}, samples=3,
                      shuffle_seed=None)
    assert [p["prompt"] for p in P.load_pairs(spec)] == [r["prompt"] for r in rows[:3]]


def test_pair_data_rejects_other_formats():
    with pytest.raises(ValueError, match="data.format must be one of"):
        P.PairData(data={"name": "fixture:dolly", "format": "dolly"})


@pytest.fixture(scope="module")
def tok():
    from llmrepro.lm.models import ModelConfig, load_tokenizer

    return load_tokenizer(ModelConfig(name="tiny-llama"))


def test_tokenize_pair_short_adds_bos_and_eos(tok):
    out = P.tokenize_pair(tok, "Which country is Oslo in?", " Oslo is in Norway.", " Oslo is in Peru.", 512, 256)
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = enc("Which country is Oslo in?")
    assert out["prompt_ids"] == [tok.bos_token_id] + prompt
    assert out["chosen_ids"] == enc("Which country is Oslo in? Oslo is in Norway.")[len(prompt):] + [tok.eos_token_id]
    assert out["rejected_ids"] == enc("Which country is Oslo in? Oslo is in Peru.")[len(prompt):] + [tok.eos_token_id]
    assert out["merged"] == 0 and out["truncated"] == 0


def test_tokenize_pair_truncates_as_trl_0_9(tok):
    """TRL 0.9.6 tokenize_row with keep_end: prompt + longer answer > max_length -> the prompt keeps its last
    max_prompt_length tokens (BOS lost); still too long -> both answers keep max_length - max_prompt_length."""
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    prompt = " ".join(["Paris is a city in France."] * 8)
    short, long = " Yes.", " " + " ".join(["Berlin is a city in Germany."] * 6)
    out = P.tokenize_pair(tok, prompt, short, long, max_length=40, max_prompt_length=16)
    p = [tok.bos_token_id] + enc(prompt)
    assert len(p) + len(enc(long)) + 1 > 40  # the case under test
    assert out["prompt_ids"] == p[-16:]
    assert out["chosen_ids"] == (enc(prompt + short)[len(enc(prompt)):] + [tok.eos_token_id])[:24]
    assert out["rejected_ids"] == (enc(prompt + long)[len(enc(prompt)):] + [tok.eos_token_id])[:24]
    assert out["truncated"] == 1
    # only the prompt cut, when that is enough
    out = P.tokenize_pair(tok, prompt, short, " No.", max_length=40, max_prompt_length=16)
    assert out["prompt_ids"] == p[-16:] and out["chosen_ids"][-1] == tok.eos_token_id


def test_with_ci_is_mc_bootstrap():
    from llmrepro.lm import mc

    values = [0, 1, 1, 0, 1, 1, 1, 0]
    out = P.with_ci("acc", values, resamples=500, seed=3)
    assert out["acc"] == pytest.approx(5 / 8)
    assert (out["acc_ci_low"], out["acc_ci_high"]) == mc.bootstrap_ci(values, k=500, seed=3)
    assert P.with_ci("acc", values, resamples=0) == {"acc": 5 / 8}
