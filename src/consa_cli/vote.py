"""One allocation from several: a vote over the units they keep full.

Search results vary by seed about as much as methods differ (docs/results.md 1f, 1g.2): on SmolLM2-135M four
seeds of one search kept 0.27-0.54 of retrieval and the vote over them 0.64, at the same perplexity. The vote
asks which units the searches agree on: each unit's votes are how many allocations keep it full, ties are
broken by its mean standardised score (each allocation's learned log_alpha, standardised per allocation), and
the top units are kept to the target, exactly as a search's own ranking would.
"""

from __future__ import annotations

import torch

from consa_cli.allocation import Allocation, AllocationError, rank_to_mask

# A vote outweighs any score difference: standardised scores are clamped to +-_TIE_BREAK_LIMIT, far below it.
_VOTE_WEIGHT = 1000.0
_TIE_BREAK_LIMIT = 100.0


def vote(allocations: list[Allocation], sparsity: float | None = None, method: str | None = None) -> Allocation:
    """The units most ``allocations`` keep full, at ``sparsity`` (default: the first allocation's).

    Every allocation must be for the same model, granularity, window and sinks. Allocations without scores take
    no part in breaking ties. The result's ``scores`` are the votes plus the tie-break squeezed into (-0.5, 0.5),
    so they rank as the vote did; ``metadata["unit_votes"]`` holds the votes per unit. ``method`` names the
    result (default ``vote of N``).
    """
    if not allocations:
        raise AllocationError("no allocations to vote over")
    first = allocations[0]
    identity = (first.fa_mask.shape, first.granularity, first.sliding_window, first.sink_tokens,
                first.model_fingerprint)
    for other in allocations[1:]:
        if (other.fa_mask.shape, other.granularity, other.sliding_window, other.sink_tokens,
                other.model_fingerprint) != identity:
            raise AllocationError("the allocations differ in shape, granularity, window, sinks or model: cannot vote")
    units = first.num_units
    votes = torch.stack([a.unit_mask.float() for a in allocations]).sum(dim=0)
    standardised = []
    for allocation in allocations:
        if allocation.scores is None:
            continue
        scores = allocation.scores.detach().float().cpu().flatten()
        if scores.numel() != units:
            raise AllocationError(f"an allocation has {scores.numel()} scores for {units} units: cannot vote")
        standardised.append((scores - scores.mean()) / scores.std().clamp(min=1e-6))
    tie_break = torch.stack(standardised).mean(dim=0) if standardised else torch.zeros(units)
    ranking = votes * _VOTE_WEIGHT + tie_break.clamp(-_TIE_BREAK_LIMIT, _TIE_BREAK_LIMIT)
    target = first.sparsity if sparsity is None else sparsity
    mask = rank_to_mask(ranking, first.granularity, first.num_layers, first.num_kv_heads, target)
    return Allocation(mask, first.granularity, first.sliding_window, first.sink_tokens,
                      method=method or f"vote of {len(allocations)}", model=first.model,
                      model_fingerprint=first.model_fingerprint,
                      scores=votes + tie_break.clamp(-0.49, 0.49),
                      metadata={"votes_of": [a.describe() for a in allocations],
                                "unit_votes": [int(v) for v in votes.tolist()]})
