"""Preference optimisation below the trainers: pair data, the source's pair tokenisation, the representation
losses of ReprPO (a name -> function table), its retain schedules, the DPO-style terms, and bootstrap CIs.

ReprPO (wassname/repr-preference-optimization, July 2024) trains a LoRA adapter so that the policy's hidden
states on the *rejected* completion move towards the reference model's hidden states on the *chosen* one
("rr", rerouting), while the policy's chosen hidden states stay where the reference had them ("retain"):

    loss = (1 - c) * L_rr + alpha * c * L_retain            c: the retain schedule, rising from 0

Each variant below is one function `(HiddenStates) -> (L_rr, L_retain or None)` that reproduces one loss of the
source exactly, including its masking and reductions (they changed between notebooks and commits; the docstring
names the notebook or file and commit). `None` for L_retain means the source trained on L_rr alone (no
schedule). A new variant is one function plus one entry in `REPR_LOSSES`.

The source has no DPO or IPO term in any ReprPO loss: its hard-coded `loss_type = 'ipo'` only makes the
sequence log-probs per-token means (used for the batch weights and the logged rewards). `dpo_loss` adds the
term as an option (weight 0 by default), computed as TRL 1.16 computes it.

Importing this module is light (pydantic only): recipe configs check names against `REPR_LOSSES` and
`SCHEDULES` when they load, so torch is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from llmrepro.core.config import RecipeConfig, Strict
from llmrepro.core.errors import UserError
from llmrepro.lm.data import DataConfig
from llmrepro.lm.mc import MCData, NumberedOptions
from llmrepro.lm.models import ModelConfig

# ------------------------------------------------------------------------------------------------ pair data

# data format -> how a row becomes (prompt, chosen, rejected) strings
PAIR_FORMATS = ("preference", "helpsteer2-dpo", "dpo-helpsteer", "binary-choice")


def to_pair(row: dict, fmt: str) -> dict:
    """One row of a preference dataset as {prompt, chosen, rejected} strings, the way the source read it."""
    if fmt == "preference":  # prompt/chosen/rejected strings (unalignment/toxic-dpo-v0.2: "chosen" is the toxic one)
        return {"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]}
    if fmt == "helpsteer2-dpo":  # Atsunori/HelpSteer2-DPO: the source renamed the *_response columns
        return {"prompt": row["prompt"], "chosen": row["chosen_response"], "rejected": row["rejected_response"]}
    if fmt == "dpo-helpsteer":  # Columbia-NLP/DPO-HelpSteer: [user, assistant] messages; `format_ds` took [1].content
        return {"prompt": row["prompt"], "chosen": row["chosen"][1]["content"],
                "rejected": row["rejected"][1]["content"]}
    if fmt == "binary-choice":  # EleutherAI/truthful_qa_binary as reprpo/eval/dpo.py mapped it: choices[~label]
        label = row["label"]
        return {"prompt": row["question"], "chosen": row["choices"][label], "rejected": row["choices"][~label]}
    raise UserError(f"format '{fmt}' is not preference data (use one of {', '.join(PAIR_FORMATS)})")


class PairData(Strict):
    """Preference pairs: a dataset, then the source's `sample()`: shuffle with `shuffle_seed`, keep `samples`."""

    data: DataConfig
    samples: int | None = Field(2250, ge=1)  # 150 * 3 * 5 in the source ("from circuit breaker * 3"); None: all
    shuffle_seed: int | None = 42  # None: keep the file order (the source's evaluation sets take the first N)

    def model_post_init(self, _) -> None:
        if self.data.format not in PAIR_FORMATS:
            raise ValueError(f"data.format must be one of {', '.join(PAIR_FORMATS)} for preference pairs, "
                             f"not {self.data.format}")


def load_pairs(spec: PairData, ctx=None) -> list[dict]:
    """The pairs `spec` names: rows read and checked by lm.data, shuffled and subsampled as the source did."""
    import datasets

    from llmrepro.lm import data

    rows = data.load_rows(spec.data, ctx)
    ds = datasets.Dataset.from_list([to_pair(r, spec.data.format) for r in rows])
    if spec.shuffle_seed is not None:
        ds = ds.shuffle(seed=spec.shuffle_seed)  # datasets' permutation: np.random.default_rng(seed), as in 2024
    if spec.samples is not None:
        ds = ds.select(range(min(len(ds), spec.samples)))
    return ds.to_list()


# ------------------------------------------------------------------------------------- tokenisation (TRL 0.9)


def _split_answer(tokenizer, prompt: str, answer: str) -> tuple[list[int], list[int]]:
    """TRL 0.9.6 `build_tokenized_answer`: tokenise prompt+answer as one string and split it at the prompt's
    token count, one token earlier when the prompt's last token merged with the answer's first."""
    full = tokenizer(prompt + answer, add_special_tokens=False)["input_ids"]
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    start = len(prompt_ids)
    if prompt_ids != full[:start]:
        start -= 1
    return full[:start], full[start:]


def tokenize_pair(tokenizer, prompt: str, chosen: str, rejected: str, max_length: int,
                  max_prompt_length: int) -> dict:
    """One pair tokenised as TRL 0.9.6's `DPOTrainer.tokenize_row` did (the version the source ran):

    prompt and answers without special tokens, BOS prepended to the prompt and EOS appended to each answer
    (unless already there); when prompt + the longer answer exceeds `max_length`, the prompt keeps its last
    `max_prompt_length` tokens ("keep_end", which also drops the BOS), and if still too long both answers keep
    their first `max_length - max_prompt_length`. Nothing is dropped (TRL 1.16 drops rows whose prompt alone
    fills max_length, and truncates the whole sequence from the end).

    Returns prompt_ids / chosen_ids / rejected_ids for TRL 1.16's collator, which shares one prompt between the
    two sequences; `merged` is 1 when the chosen and rejected prompts differed (a token merged across the
    boundary in one of them): the prompt is then their common prefix and the rest counts as completion;
    `truncated` is 1 when the pair was cut.
    """
    c_prompt, c_answer = _split_answer(tokenizer, prompt, chosen)
    r_prompt, r_answer = _split_answer(tokenizer, prompt, rejected)
    n_diff = sum(a != b for a, b in zip(c_prompt, r_prompt, strict=False))
    if n_diff > 1 or abs(len(c_prompt) - len(r_prompt)) > 1:  # TRL 0.9.6 raises the same
        raise UserError(f"pair with prompt {prompt[:60]!r}: the chosen and rejected prompts tokenise differently "
                        "beyond the last token")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    seqs = []
    for p, a in ((c_prompt, c_answer), (r_prompt, r_answer)):
        p = p if (p and p[0] == bos) or bos is None else [bos] + p
        a = a if a and a[-1] == eos else a + [eos]
        seqs.append([p, a])
    longer = max(len(seqs[0][1]), len(seqs[1][1]))
    truncated = any(len(s[0]) + longer > max_length for s in seqs)
    for s in seqs:
        if len(s[0]) + longer > max_length:
            s[0] = s[0][-max_prompt_length:]
    for s in seqs:
        if len(s[0]) + longer > max_length:
            s[1] = s[1][: max_length - max_prompt_length]
    (cp, ca), (rp, ra) = seqs
    shared = 0
    while shared < min(len(cp), len(rp)) and cp[shared] == rp[shared]:
        shared += 1
    return {"prompt_ids": cp[:shared], "chosen_ids": cp[shared:] + ca, "rejected_ids": rp[shared:] + ra,
            "merged": int(cp != rp), "truncated": int(truncated)}


# ------------------------------------------------------------------------------------ representation losses


@dataclass
class HiddenStates:
    """What a representation loss reads. Hidden states are (B, L, T, H): the B pairs of a micro-batch, the L
    collected layers, T padded positions (prompt + completion, right-padded), hidden size H. Masks are the
    attention masks (B, T) of the chosen and rejected sequences. `weight` (B,) is the detached batch weight
    softmax(-30 * logits) of the source: retain terms use it, rr terms use 1 - weight."""

    policy_chosen: object
    policy_rejected: object
    ref_chosen: object
    mask_chosen: object
    mask_rejected: object
    weight: object

    def premasked(self) -> tuple:
        """(policy_chosen, policy_rejected, ref_chosen), each multiplied by its own row's attention mask: the
        source did this in `concatenated_forward` up to commit 1a42e87 (padded positions become 0)."""
        mc, mr = self.mask_chosen[:, None, :, None], self.mask_rejected[:, None, :, None]
        return self.policy_chosen * mc, self.policy_rejected * mr, self.ref_chosen * mc


def _l2(x, y):
    """||x - y||_2 over the hidden dim, at least in float32 (the source's `sum_squared_error`, from circuit-breakers,
    took `dtype=torch.float` to upcast bf16 hidden states)."""
    import torch

    d = x - y
    return torch.linalg.vector_norm(d, dim=-1, dtype=torch.promote_types(d.dtype, torch.float32))  # (B, L, T)


def _cos(x, y):
    import torch.nn.functional as F

    return F.cosine_similarity(x, y, dim=-1)  # (B, L, T); 0 where a vector is all zero (eps clamp)


def _norm_l1(x, y):
    """The magnitude half of the source's `combined_loss`: mean |‖x‖ - ‖y‖| over every (b, l, t), a scalar."""
    import torch.nn.functional as F

    return F.l1_loss(x.norm(dim=-1), y.norm(dim=-1))


def _centred_similarity(x, y):
    """The source's `cka_inspired_similarity` (04_hf_cka_fail): a Pearson correlation over the hidden dim."""
    xc, yc = x - x.mean(dim=-1, keepdim=True), y - y.mean(dim=-1, keepdim=True)
    return (xc * yc).sum(-1) / (xc.norm(dim=-1) * yc.norm(dim=-1) + 1e-8)  # (B, L, T)


def _topk_sq(x, y, fraction: float = 0.005):
    """The source's `top_k_mse`: mean of the k = int(fraction * H) + 1 largest squared differences along H."""
    k = int(fraction * x.shape[-1]) + 1
    return ((x - y) ** 2).topk(k, dim=-1).values.mean(-1)  # (B, L, T)


def _symlog(x, eps: float = 1e-6):
    """sign(x) * log(|x| + eps): the source's `symlog` (not log1p, so |x| < 1 maps to negative magnitudes)."""
    return x.sign() * (x.abs() + eps).log()


def _bcast(w, x):
    while w.dim() < x.dim():
        w = w.unsqueeze(-1)
    return w


def _wmean_shifted(x, w):
    """The source's first `wmean` (826ca0c notebooks, trainer.py @2c065f7): weights shifted to w - min(w) + 0.1,
    weighted mean over the batch dim. On an already-reduced 0-d loss it returns the loss unchanged."""
    w = _bcast(w - w.min() + 0.1, x)
    return (x * w).sum(0) / w.sum(0)


def _wmean(x, w, keepdim: bool = False):
    """The source's later `wmean` (trainer.py @1a42e87; keepdim from 74002da): plain weighted mean over batch."""
    w = _bcast(w, x)
    return (x * w).sum(0, keepdim=keepdim) / w.sum(0, keepdim=keepdim)


def _mean_with_attention(x, mask):
    """The source's `mean_with_attention` (74002da on): mean over positions where `mask` is 1; (B, L, T, K) ->
    (B, L, K)."""
    m = mask[:, None, :, None].to(x.dtype)
    return (x * m).sum(2) / m.sum(2)


def mse(hs: HiddenStates):
    """`01_hf` @826ca0c (07-14 table, "original mse"): ‖h^pi_rej - h^ref_cho‖_2 over H, nanmean over every
    (b, l, t), padding included (pre-masked hidden states, so a padded position of only one row still counts);
    retain the same for the chosen rows. The source then applied `wmean`, a no-op on a 0-d loss."""
    pc, pr, rc = hs.premasked()
    return _l2(pr, rc).nanmean(), _l2(pc, rc).nanmean()


def direction(hs: HiddenStates):
    """`02_hf_direction_good` @826ca0c: rr = mean of 1 - cos(h^pi_rej, h^ref_cho) over every (b, l, t) (a
    position padded in both rows contributes 1); retain = mean (1 - cos) of the chosen rows plus the mean
    |‖h^pi_cho‖ - ‖h^ref_cho‖| (`combined_loss(..., 1)` + `combined_loss(..., 0)`). No batch weights."""
    pc, pr, rc = hs.premasked()
    return (1 - _cos(pr, rc)).nanmean(), (1 - _cos(pc, rc)).nanmean() + _norm_l1(pc, rc)


def topk(hs: HiddenStates):
    """`02_hf_topk` @1a42e87 (inline trainer of the 07-14 runs, also `06_hf_topk`): rr = top-0.5 % squared
    differences along H, batch-weighted (shifted `wmean`, 1 - w), mean over (l, t); retain = elementwise squared
    error, batch-weighted with w, mean over (l, t, h)."""
    pc, pr, rc = hs.premasked()
    return _wmean_shifted(_topk_sq(pr, rc), 1 - hs.weight).mean(), _wmean_shifted((pc - rc) ** 2, hs.weight).mean()


def rr_only(hs: HiddenStates):
    """`03_wd_TODO` @826ca0c ("using only RR loss and weight decay"): the mse rr term alone, no retain term and
    no schedule (the weight decay is a training argument)."""
    _, pr, rc = hs.premasked()
    return _l2(pr, rc).nanmean(), None


def cka(hs: HiddenStates):
    """`04_hf_cka_fail` @826ca0c: the centred (Pearson-like) similarity over H per (b, l, t), nanmean, for rr
    and for retain. The source *minimised the similarity itself*, pushing the policy's rejected and chosen
    states away from the reference chosen ones; the run collapsed (TQA 0.176, then an assertion stopped it).
    Kept with that sign on purpose."""
    pc, pr, rc = hs.premasked()
    return _centred_similarity(pr, rc).nanmean(), _centred_similarity(pc, rc).nanmean()


def topk_rr(hs: HiddenStates):
    """`07_hf_topkGOOD` @1a42e87 (TQA 64.44, layers 10/20/26): rr = top-0.5 % squared differences, plain
    `wmean` over the batch with 1 - w, mean over (l, t). The notebook computed a retain term and then replaced
    the combined loss by `loss_rr.sum()`, so it trained on rr alone (its alpha=3000 did nothing)."""
    _, pr, rc = hs.premasked()
    return _wmean(_topk_sq(pr, rc), 1 - hs.weight).mean(), None


def direction_tokens(hs: HiddenStates):
    """`07_hf_direction_TODO` @1a42e87 (TQA 51.82 with layer 26): per position 1 - cos, batch-weighted (plain
    `wmean`, 1 - w), summed over (l, t) and divided by L * (number of real rejected tokens in the batch); the
    source's divisor counts tokens over all B rows, so this is about 1/B of a token mean. Retain: (1 - cos)
    plus the scalar mean norm difference, weighted with w, divided by L * (chosen tokens)."""
    pc, pr, rc = hs.premasked()
    n_layers = pr.shape[1]
    rr = _wmean(1 - _cos(pr, rc), 1 - hs.weight).sum() / (n_layers * hs.mask_rejected.sum())
    retain = _wmean((1 - _cos(pc, rc)) + _norm_l1(pc, rc), hs.weight).sum() / (n_layers * hs.mask_chosen.sum())
    return rr, retain


def norm_smooth_l1(hs: HiddenStates):
    """`07_hf_wd` @1a42e87 (with weight decay): smooth-L1 (mean) between the norms of the mean-centred hidden
    states, ‖h^pi_rej - mean_H‖ vs ‖h^ref_cho - mean_H‖, over every (b, l, t); rr alone (the source's `wmean`
    on the scalar is a no-op)."""
    import torch.nn.functional as F

    _, pr, rc = hs.premasked()
    centred_norm = lambda x: (x - x.mean(dim=-1, keepdim=True)).norm(dim=-1)  # noqa: E731
    return F.smooth_l1_loss(centred_norm(pr), centred_norm(rc)), None


def regular(hs: HiddenStates):
    """trainer.py `reprpo_loss` @1a42e87 (the library default of the 07-15 `07_hf_regular` run, TQA 54.58):
    rr = ‖(h^pi_rej - h^ref_cho) * m_rej‖_2 per (b, l, t), plain `wmean` with 1 - w over the batch, summed
    over (l, t) / (L * rejected tokens in the batch); retain the same for chosen with m_cho and w."""
    pc, pr, rc = hs.premasked()
    mc, mr = hs.mask_chosen[:, None, :, None], hs.mask_rejected[:, None, :, None]
    n_layers = pr.shape[1]
    rr = _wmean(_l2(pr * mr, rc * mr), 1 - hs.weight).sum() / (n_layers * hs.mask_rejected.sum())
    retain = _wmean(_l2(pc * mc, rc * mc), hs.weight).sum() / (n_layers * hs.mask_chosen.sum())
    return rr, retain


def regular_final(hs: HiddenStates):
    """trainer.py `reprpo_loss` @00a471c (the final July version): no pre-masking; ‖h^pi_rej - h^ref_cho‖_2
    averaged over the positions real in *both* rows (m_rej * m_cho) per (b, l), `wmean` (keepdim) with 1 - w
    over the batch, mean over layers; retain averaged over the chosen positions, weighted with w."""
    l2 = lambda x, y: _l2(x, y).unsqueeze(-1)  # noqa: E731  (B, L, T, 1): the source's keepdim=True
    rr = _wmean(_mean_with_attention(l2(hs.policy_rejected, hs.ref_chosen), hs.mask_rejected * hs.mask_chosen),
                1 - hs.weight, keepdim=True).mean()
    retain = _wmean(_mean_with_attention(l2(hs.policy_chosen, hs.ref_chosen), hs.mask_chosen), hs.weight,
                    keepdim=True).mean()
    return rr, retain


def symlog(hs: HiddenStates):
    """`09_hf_symlog_TODO` @00a471c (`ReprPOTrainer2`): squared difference of symlog(h) elementwise, averaged
    over the positions real in both rows (retain: chosen positions), then over (b, l, h). No batch weights."""
    sq = lambda x, y: (_symlog(x) - _symlog(y)) ** 2  # noqa: E731
    rr = _mean_with_attention(sq(hs.policy_rejected, hs.ref_chosen), hs.mask_rejected * hs.mask_chosen).mean()
    retain = _mean_with_attention(sq(hs.policy_chosen, hs.ref_chosen), hs.mask_chosen).mean()
    return rr, retain


REPR_LOSSES: dict[str, Callable[[HiddenStates], tuple]] = {
    "mse": mse, "direction": direction, "topk": topk, "rr-only": rr_only, "cka": cka, "topk-rr": topk_rr,
    "direction-tokens": direction_tokens, "norm-smooth-l1": norm_smooth_l1, "regular": regular,
    "regular-final": regular_final, "symlog": symlog,
}


def combine(rr, retain, c: float, alpha: float):
    """(1 - c) * L_rr + alpha * c * L_retain; L_rr alone when the variant has no retain term."""
    return rr if retain is None else (1 - c) * rr + alpha * c * retain


# ------------------------------------------------------------------------------------------ retain schedules


def schedule_rows(step: int, max_steps: int, rows: int) -> float:
    """The schedule of every July 14/15 result: `coeffecient(global_step + 1, len(train_dataset))`, c = t / 2T with
    T the number of training *rows* (2250), not steps, so c only reaches about 0.034 after 150 steps (the
    author found this later: "total steps might not be working"). 1a42e87 added `t % T` (no effect while t < T)."""
    t = (step + 1) % rows
    return t / (2 * rows)


def schedule_progress(step: int, max_steps: int, rows: int) -> float:
    """trainer.py `get_coeff` @00a471c: c = (global_step / optimizer steps) % 1 / 2, rising from 0 to 0.5."""
    return (step / max(max_steps, 1)) % 1 / 2


SCHEDULES: dict[str, Callable[[int, int, int], float]] = {"rows": schedule_rows, "progress": schedule_progress}


# ------------------------------------------------------------------------------------ log-probs and DPO terms


def sequence_logps(per_token_logps, completion_mask, reduction: Literal["sum", "mean"]):
    """Per-sequence log-prob of the completion: TRL's sum over completion tokens, or the source's per-token mean
    (its `loss_type == 'ipo'` branch). per_token_logps: (N, T-1) zero off the completion; completion_mask (N, T)."""
    total = per_token_logps.sum(1)
    if reduction == "sum":
        return total
    return total / completion_mask[:, 1:].sum(1).clamp(min=1)


def batch_weight(logits, temperature: float = 30.0):
    """The source's detached batch weight softmax(-T * logits) over the micro-batch (T = 30): pairs the policy
    already prefers more than the reference does get less retain weight and more rr weight."""
    return (-temperature * logits).softmax(0).detach()


DPO_LOSS_TYPES = ("sigmoid", "ipo")


def dpo_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, completion_mask, beta: float,
             loss_type: str):
    """The DPO-style term on *summed* log-probs, as TRL 1.16's `_compute_loss` computes it (mean over pairs):
    sigmoid -logsigmoid(beta * delta); ipo (delta per completion token - 1 / (2 beta))^2 (TRL's IPO is length-
    normalised). delta = (pi_c - ref_c) - (pi_r - ref_r)."""
    import torch.nn.functional as F

    chosen_scores, rejected_scores = chosen_logps - ref_chosen_logps, rejected_logps - ref_rejected_logps
    if loss_type == "sigmoid":
        per_pair = -F.logsigmoid(beta * (chosen_scores - rejected_scores))
    elif loss_type == "ipo":
        mask_c, mask_r = completion_mask.chunk(2, dim=0)
        delta = chosen_scores / mask_c.sum(1).clamp(min=1.0) - rejected_scores / mask_r.sum(1).clamp(min=1.0)
        per_pair = (delta - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r} (known: {', '.join(DPO_LOSS_TYPES)})")
    return per_pair.mean()


# ----------------------------------------------------------------------------------------- summary metrics


def with_ci(name: str, values, resamples: int = 2000, seed: int = 0) -> dict:
    """{name, name_ci_low, name_ci_high}: the mean of `values` with a 95% percentile bootstrap interval (lm.mc's, the
    one mc-eval reports), the shape `llmrepro compare` shows as one value with its interval. No interval with
    `resamples` 0; NaN for no values."""
    from llmrepro.lm import mc

    values = [float(v) for v in values]
    mean = sum(values) / len(values) if values else math.nan
    if not resamples:
        return {name: mean}
    low, high = mc.bootstrap_ci(values, k=resamples, seed=seed)
    return {name: mean, f"{name}_ci_low": low, f"{name}_ci_high": high}


# ------------------------------------------------------------------------------------------- recipe configs


class PreferenceTrain(Strict):
    """Training arguments (TRL's DPOConfig fields). Defaults are the source's (07-14/15 notebooks' config cells)."""

    learning_rate: float = Field(1e-4, gt=0)  # ReprPO 1e-4 ("this method needs much more"); the DPO baseline 2e-6
    batch_size: int = Field(4, ge=1)
    gradient_accumulation_steps: int = Field(4, ge=1)  # ideal_batch_size 16 // batch_size
    epochs: float = Field(1.0, gt=0)
    max_steps: int = -1  # > 0 overrides epochs
    lr_scheduler: str = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: str = "adamw_8bit"  # bitsandbytes 8-bit AdamW (TRL/transformers `optim` names)
    max_grad_norm: float = Field(1.0, gt=0)
    bf16: bool = True  # mixed precision (autocast); the source also set tf32, applied here on CUDA only
    tf32: bool = True
    gradient_checkpointing: bool = True
    logging_steps: int = Field(1, ge=1)
    save_steps: int = Field(50, ge=1)  # checkpoints for --resume (the source saved none)
    max_length: int = Field(512, ge=8)
    max_prompt_length: int = Field(256, ge=1)
    # trl-0.9: TRL 0.9.6's tokenize_row (prompt keep-end to max_prompt_length, then responses; nothing dropped), as
    # the source ran; trl-1.16: the installed TRL's own (whole sequence keep-start, rows with long prompts dropped)
    tokenization: Literal["trl-0.9", "trl-1.16"] = "trl-0.9"
    disable_dropout: bool = True  # TRL's default, in 0.9.6 too: it also zeroes LoRA dropout, as in the source
    # TRL 1.16 casts a quantized model's adapter to bf16; the source's peft 0.11 kept it in float32
    adapter_dtype: Literal["float32", "bfloat16"] = "float32"

    def model_post_init(self, _) -> None:
        if self.max_prompt_length >= self.max_length:
            raise ValueError("max_prompt_length must be below max_length")


class TQAEval(Strict):
    """TruthfulQA MC1 as the source scored it (lm.mc's `numbered` mode): the first `data.limit` questions of the HF
    dataset. TruthfulQA's own mc_task.json (also readable here, `name: <path>/mc_task.json`) lists the questions in
    another order (HF's first question is its 529th), so its first 200 are other questions."""

    data: MCData = MCData(name="truthfulqa/truthful_qa", subset="multiple_choice", split="validation", limit=200)
    options: NumberedOptions = NumberedOptions()  # system prompt reprpo-0714 (the 07-14 table) or reprpo-library
    scale: Literal[1, 100] = 1  # the 07-14 table is 0-1; the library eval (07_hf_*: 53.49, 64.44) printed percent


class PreferenceEval(Strict):
    """What is measured after training, for the adapter and for the base model (adapter disabled)."""

    tqa: TQAEval | None = TQAEval()
    # named pair sets scored as the source's reprpo/eval/dpo.py did (per-token-mean log-ratio chosen vs rejected > 0),
    # e.g. held-out HelpSteer2, TruthfulQA binary, toxic-dpo; each its first `samples` rows (shuffle_seed null)
    pairs: dict[str, PairData] = {}
    train_pairs: int | None = Field(200, ge=1)  # training pairs re-scored after training (None: all)
    batch_size: int = Field(4, ge=1)
    bootstrap_resamples: int = Field(2000, ge=0)  # as mc-eval's default

    def model_post_init(self, _) -> None:
        for name in self.pairs:
            if not name.replace("_", "").isalnum() or name in ("train", "tqa"):
                raise ValueError(f"pair set name '{name}': use letters, digits and _ (not train or tqa)")


class PreferenceConfig(RecipeConfig):
    """What the `dpo` and `reprpo` recipes share: the model (with its LoRA), the pairs, training and evaluation."""

    model: ModelConfig
    data: PairData
    train: PreferenceTrain = PreferenceTrain()
    eval: PreferenceEval = PreferenceEval()
    beta: float = Field(0.1, gt=0)  # DPO's beta; in ReprPO only the logged rewards use it
    save_adapter: bool = True

    def model_post_init(self, _) -> None:
        if self.model.lora is None:
            raise ValueError("model.lora is required: the preference recipes train a LoRA adapter and use the "
                             "model with the adapter disabled as the reference")
        if self.model.gradient_checkpointing:
            raise ValueError("model.gradient_checkpointing: set train.gradient_checkpointing instead (the trainer "
                             "turns it on)")
