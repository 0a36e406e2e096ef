"""
Direct Preference Optimization: the loss, and the log-probabilities it is made of.

Why this loss (Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model", arXiv:2305.18290). RLHF looks for a policy pi that maximises
E_{x, y~pi}[r(x,y)] - beta*KL(pi || pi_ref): reward, but not too far from the reference model.
For a fixed prompt x this is maximised exactly by (the paper's Eq. 4)
    pi*(y|x) = pi_ref(y|x) * exp(r(x,y)/beta) / Z(x),     Z(x) = sum_y pi_ref(y|x) exp(r(x,y)/beta),
and solving that for the reward gives r(x,y) = beta*log(pi*(y|x)/pi_ref(y|x)) + beta*log Z(x) (Eq. 5).
So every policy defines an "implicit reward" r_hat = beta*log(pi/pi_ref), up to a term that depends
on x alone. Human preferences are modelled by Bradley-Terry: P(y_w beats y_l | x) = sigmoid(r_w - r_l).
Only a difference of rewards of the same prompt appears there, so beta*log Z(x) cancels, and the
maximum-likelihood fit of the preferences becomes a loss on the policy itself, no reward model needed
(Eq. 7):
    L = -log sigmoid(beta * [log pi(y_w)/pi_ref(y_w) - log pi(y_l)/pi_ref(y_l)])
with log pi(y|x) the SUM of the response tokens' log-probabilities. Its gradient is
    dL/dtheta = -beta * sigmoid(r_hat_l - r_hat_w) * [grad log pi(y_w) - grad log pi(y_l)]:
each pair is weighted by how wrongly the implicit reward currently orders it, so pairs that are
already ranked right by a wide margin stop pulling.
"""
import torch
import torch.nn.functional as F

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def check_loss_args(beta, loss_type, label_smoothing):
    """Raise ValueError, naming the argument, unless the loss settings are usable. dpo_loss calls
    it on every call; train.py can call it first, to reject a bad command line before any work."""
    if not isinstance(beta, (int, float)) or not beta > 0:
        raise ValueError(f"beta must be a number > 0, got {beta!r}")
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown loss_type {loss_type!r}; expected one of {LOSS_TYPES}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid' only, not {loss_type!r}")


def dpo_loss(policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
             reference_rejected_logps, beta=0.1, loss_type="sigmoid", label_smoothing=0.0,
             chosen_lengths=None, rejected_lengths=None):
    """Per-pair preference losses and implicit rewards, all of shape (B,).

    h = [log pi(y_w) - log pi_ref(y_w)] - [log pi(y_l) - log pi_ref(y_l)], from SUMMED log-probs
    (the lengths, if passed, are used by ipo only):
      sigmoid  -log sigmoid(beta*h): DPO, Rafailov et al. 2023, arXiv:2305.18290, Eq. 7.
               With label_smoothing eps > 0, -(1-eps) log sigmoid(beta*h) - eps log sigmoid(-beta*h):
               conservative DPO (cDPO), E. Mitchell 2023, "A note on DPO with noisy preferences &
               relationship to IPO" (a note, not on arXiv). eps of the labels are assumed flipped,
               so the loss is smallest at a finite margin instead of pushing it up forever.
      ipo      (h' - 1/(2*beta))**2: IPO, Azar et al. 2023, arXiv:2310.12036, Eq. 17 (beta is the
               paper's tau). Regresses the margin onto a fixed target. The paper's h uses sequence
               log-probs; here h' is built from per-token MEAN log-ratios (needs the lengths), so
               the target does not depend on how long the responses are.
      hinge    relu(1 - beta*h) = beta * max(0, 1/beta - h): the calibration loss of SLiC-HF,
               Zhao et al. 2023, arXiv:2305.10425, max(0, delta - log P(y_w|x) + log P(y_l|x)),
               with margin delta = 1/beta, on log-ratios to the reference, without its
               cross-entropy regulariser.
    Reference-free: pass None for both reference log-probs; they are taken as 0 (Eq. 7 with the
    reference dropped; no paper of its own), so the policy's own log-likelihood ratio is pushed
    up with no anchor to a reference. Works with every loss_type.
    Returns (losses, chosen_rewards, rejected_rewards); rewards = beta*(log pi - log pi_ref), detached.
    """
    check_loss_args(beta, loss_type, label_smoothing)
    if (reference_chosen_logps is None) != (reference_rejected_logps is None):
        raise ValueError("pass both reference log-probs, or None for both (reference-free)")
    if reference_chosen_logps is None:
        reference_chosen_logps = torch.zeros_like(policy_chosen_logps)
        reference_rejected_logps = torch.zeros_like(policy_rejected_logps)
    named = dict(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                 reference_chosen_logps=reference_chosen_logps,
                 reference_rejected_logps=reference_rejected_logps)
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("loss_type='ipo' needs chosen_lengths and rejected_lengths (response token counts)")
        named.update(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    shape = policy_chosen_logps.shape
    for name, t in named.items():
        if not torch.is_tensor(t) or t.shape != shape or t.dim() != 1:
            got = tuple(t.shape) if torch.is_tensor(t) else type(t).__name__
            raise ValueError(f"{name} must be a 1-D tensor of shape {tuple(shape)} (one value per pair), got {got}")

    chosen_logratios = policy_chosen_logps - reference_chosen_logps
    rejected_logratios = policy_rejected_logps - reference_rejected_logps
    if loss_type == "sigmoid":
        h = chosen_logratios - rejected_logratios
        eps = label_smoothing
        losses = -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        if (chosen_lengths <= 0).any() or (rejected_lengths <= 0).any():
            raise ValueError("chosen_lengths and rejected_lengths must be > 0")
        h = chosen_logratios / chosen_lengths - rejected_logratios / rejected_lengths
        losses = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        h = chosen_logratios - rejected_logratios
        losses = torch.relu(1 - beta * h)
    return losses, beta * chosen_logratios.detach(), beta * rejected_logratios.detach()


# ------------------------------------------------------------------------------------------------
# log-probabilities of responses

def sequence_logps(logits, ids, mask):
    """Summed log-probability of the response tokens of each row, and their count.

    logits (B, T, V) from the model on ids (B, T); mask (B, T) is True at response tokens.
    Returns (logps (B,), n_tokens (B,)). The plain definition; response_logps is the fast path.
    """
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V), in fp32 under bf16
    # the one-token shift: the logit at position t predicts token t+1
    token_logps = logprobs.gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)  # (B, T-1)
    scored = mask[:, 1:]  # token t+1 counts iff it is a response token (not prompt, not padding)
    # where, not a multiply: a masked-out -inf would give -inf * 0 = nan
    return torch.where(scored, token_logps, 0.0).sum(1), scored.sum(1)


def response_token_logps(model, ids, mask):
    """Log-probability of each response token, (N,) for the N True entries of mask[:, 1:], in
    row-major order. Only the N positions that predict a response token go through lm_head, the
    C x V matmul that is the costliest layer for GPT-2's V = 50257, so the (B, T, V) logits of prompt
    and padding are never made; cross_entropy is -log_softmax followed by the gather of the target."""
    scored = torch.zeros_like(mask)
    scored[:, :-1] = mask[:, 1:]                   # position t-1 predicts response token t
    logits = model(ids, select=scored)             # (N, V), rows in row-major order of `scored`
    return -F.cross_entropy(logits.float(), ids[:, 1:][mask[:, 1:]], reduction="none")  # (N,)


def row_sums(tok, mask):
    """response_token_logps' (N,) values summed per row of mask (B, T) -> (B,), with index_add."""
    rows = mask[:, 1:].nonzero()[:, 0]
    return torch.zeros(mask.shape[0], dtype=tok.dtype, device=tok.device).index_add(0, rows, tok)


def response_logps(model, ids, mask):
    """The same quantity as sequence_logps(model(ids), ids, mask) (tested: values and gradients),
    computed the way training needs it fast: response_token_logps, summed per row."""
    return row_sums(response_token_logps(model, ids, mask), mask), mask[:, 1:].sum(1)


def concatenated_logps(model, ids, mask, with_tokens=False):
    """Chosen and rejected in ONE forward pass. ids/mask (2B, T): rows [0, B) are prompt+chosen,
    rows [B, 2B) prompt+rejected. One call instead of two: half the kernel launches, and matmuls
    twice as tall, which run closer to the hardware's peak. Returns (chosen, rejected, n_c, n_r),
    and with_tokens=True appends response_token_logps' (N,) per-token values (for unlikelihood)."""
    tok = response_token_logps(model, ids, mask)
    logps, n, B = row_sums(tok, mask), mask[:, 1:].sum(1), ids.shape[0] // 2
    return (logps[:B], logps[B:], n[:B], n[B:]) + ((tok,) if with_tokens else ())


# ------------------------------------------------------------------------------------------------
# the Unlikelihood baseline of the DPO paper (its Figure 2)

def rejected_after_divergence(ids, mask):
    """(N,) bool over response_token_logps' tokens of a concatenated batch (rows [0, B) chosen,
    [B, 2B) rejected): True at the rejected tokens from the first position where the rejected row
    differs from its chosen one. The shared start of the two responses carries no preference, and
    pushing it down while the likelihood term pulls it up would only make the two terms fight."""
    B = ids.shape[0] // 2
    differs = (ids[B:] != ids[:B]) | (mask[B:] != mask[:B])              # (B, T)
    after = (differs.cumsum(1) > 0) & mask[B:]                           # from the first difference on
    penalised = torch.cat([torch.zeros_like(after), after])             # (2B, T); chosen rows never
    return penalised[:, 1:][mask[:, 1:]]


def unlikelihood_loss(policy_chosen_logps, chosen_lengths, rejected_token_logps, alpha):
    """Likelihood of the chosen responses plus alpha times the unlikelihood of the rejected ones:
        L = -sum log pi(y_w) / |y_w|  +  alpha * mean_t -log(1 - pi(y_l,t | x, y_l,<t))
    The first term is Preferred-FT's per-token negative log-likelihood (alpha = 0 is Preferred-FT);
    the second is token-level unlikelihood training (Welleck et al. 2019, "Neural Text Generation
    with Unlikelihood Training", arXiv:1908.04319), applied to the rejected response's tokens
    after it departs from the chosen one (rejected_after_divergence), averaged over those tokens.
    This is the DPO paper's Unlikelihood baseline (Rafailov et al. 2023, Sec. 6, its baselines: maximise
    p(y_w|x), minimise p(y_l|x), with a coefficient alpha in [0, 1] on the unlikelihood term). The
    token form, not -log(1 - pi(y_l|x)) of the whole sequence: a sequence's probability is ~0, so
    that term would carry no gradient. Its gradient per token is pi/(1 - pi) times d(log pi), which
    grows without bound as pi -> 1 (the instability the paper reports), so 1 - pi is floored at 1e-5,
    as in Welleck et al.'s code: a token with pi > 1 - 1e-5 then gets no gradient at all. Per-token
    means, over the tokens of the batch, as in Preferred-FT.
    -> (loss, its likelihood term, its unlikelihood term), the terms detached."""
    if not 0 <= alpha:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    nll = -policy_chosen_logps.sum() / chosen_lengths.sum()
    one_minus_p = (-torch.expm1(rejected_token_logps)).clamp(min=1e-5)  # 1 - exp(logp), accurate near p = 1
    ul = -torch.log(one_minus_p).sum() / max(len(rejected_token_logps), 1)  # no tokens: 0, not nan
    return nll + alpha * ul, nll.detach(), ul.detach()
