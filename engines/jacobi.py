"""Speculative Jacobi Decoding (Teng et al., 2024): several tokens per GPT forward, losslessly.

Each forward feeds a window of `window` drafted tokens after the accepted prefix. The
forward returns, for every window position, the model's distribution given the drafts
before it. Drafts are then verified left to right with the speculative-sampling rule:
draft x drawn from q is kept with probability min(1, p(x) / q(x)); the first rejected
position is redrawn from norm(max(p - q, 0)); if all are kept, the position after the
window is drawn from its (now exact) p. Every kept token is therefore an exact sample of
the sequential distribution. At temperature 0 the rule reduces to "keep the draft if it is
the argmax", so the tokens equal greedy sequential decoding exactly. Positions past the
first rejection get fresh drafts from this forward's distributions (the Jacobi update);
positions past the window are drafted from the last distribution computed.

Images in a batch share the forward but keep their own accepted length: a finished
position of an image that is ahead is fed as a fixed token, so no image waits for or
truncates another's accepted run. Randomness comes from each image's own stream.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .ar_decoding import ImageNoise, _guide, draw, token_probs
from .gpt import GPT


def jacobi_decode(
    model: GPT,
    logits: torch.Tensor,
    seq: torch.Tensor,
    start: int,
    forced: torch.Tensor,
    forced_ids: torch.Tensor,
    scales: torch.Tensor | None,
    noise: ImageNoise,
    *,
    window: int,
    temperature: float,
    top_k: int,
    top_p: float,
    callback: Callable[[dict], None] | None = None,
) -> tuple[int, float]:
    """Fill seq[:, start:] ([B, n], prefilled KV cache up to `start`; `logits` [B, V] predict
    position `start`). Returns the GPT forwards the batch ran, and the mean over images of
    the forwards each image needed (an image ahead finishes before the batch does)."""
    if window < 1:
        raise ValueError(f"the Jacobi window must be at least 1 token, got {window}")
    b, n = seq.shape
    device = seq.device
    t = model.prefix_len
    rows = model.layers[0].attention.kv_cache.k_cache.shape[0]
    greedy = temperature <= 0

    def dist(lg: torch.Tensor) -> torch.Tensor:
        return lg.float() if greedy else token_probs(lg, temperature, top_k, top_p)

    def pick(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return p.argmax(-1) if greedy else draw(p, u)

    def report(lo: int, hi: int) -> None:
        if callback is not None:
            for i in range(lo, hi):
                callback({"i": i, "total": n, "tokens": seq[:, : i + 1]})

    # the first token is exact: its condition is all accepted
    p0 = dist(logits)
    u0 = noise.uniform(window + 1, device=device)
    seq[:, start] = torch.where(forced[:, start], forced_ids[:, start], pick(p0, u0[:, 0]))
    report(start, start + 1)
    accepted = torch.full((b,), start + 1, dtype=torch.long, device=device)  # per image
    w = start + 1  # window start: the first position some image has not accepted
    q = p0[:, None].expand(b, window, p0.shape[-1])  # the drafts' proposal distributions
    drafts = pick(q, u0[:, 1:])
    forwards = 0
    done_at = torch.zeros(b, dtype=torch.long, device=device)
    while w < n:
        e = min(w + window, n)
        m = e - w
        final = torch.arange(w, e, device=device)[None] < accepted[:, None]
        fixed = forced[:, w:e]
        cur = torch.where(final, seq[:, w:e], drafts[:, :m])
        cur = torch.where(fixed, forced_ids[:, w:e], cur)
        ids = torch.cat([seq[:, w - 1 : w], cur], 1)  # tokens at positions w-1 .. e-1
        if rows != b:
            ids = torch.cat([ids, ids])
        out = model(model.embed_tokens(ids), t + torch.arange(w - 1, e, device=device))
        k = m + 1 if e < n else m  # distributions for positions w .. w+k-1
        out = out[:, :k]
        p = dist(_guide(out, b, None if scales is None else scales[w : w + k, None]))
        forwards += 1

        u = noise.uniform(3, window + 1, device=device)
        pm = p[:, :m]
        if greedy:
            ok = cur == pm.argmax(-1)
            repl = p.argmax(-1)
        else:
            qm = q[:, :m]
            p_x = pm.gather(-1, cur[..., None]).squeeze(-1)
            q_x = qm.gather(-1, cur[..., None]).squeeze(-1)
            ok = u[:, 0, :m] * q_x < p_x
            residual = (pm - qm).clamp_min(0)
            residual = torch.where(residual.sum(-1, keepdim=True) > 0, residual, pm)
            repl = draw(residual, u[:, 1, :m])
            if k > m:  # every draft kept: the position after the window is exact
                repl = torch.cat([repl, draw(p[:, m], u[:, 1, m])[:, None]], 1)
        ok = ok | final | fixed
        first_bad = torch.where(ok.all(1), m, (~ok).to(torch.int8).argmax(1))  # [B]
        span = torch.arange(k, device=device)[None]
        kept = torch.cat([cur, repl[:, m:]], 1)  # the drafts; the bonus slot if there is one
        new = torch.where(span < first_bad[:, None], kept, repl)
        new = torch.where(forced[:, w : w + k], forced_ids[:, w : w + k], new)
        seq[:, w : w + k] = torch.where(span <= first_bad[:, None], new, seq[:, w : w + k])
        accepted = torch.clamp(w + first_bad + 1, max=n)
        done_at = torch.where((accepted >= n) & (done_at == 0), forwards, done_at)

        w_next = int(accepted.min())
        report(w, w_next)
        w = w_next
        if w >= n:
            break
        # Jacobi update: fresh drafts for the next window from this forward's distributions
        rel = (torch.arange(w, w + window, device=device) - (e - m)).clamp(max=k - 1)
        q = p[:, rel]
        drafts = pick(q, u[:, 2, :window])
    return forwards, float(done_at.float().mean())
