"""The statistics the experiment reports share: mean ± std over seeds, and whether one row
beats another beyond the seed spread."""

from __future__ import annotations

import math
import statistics


def mean_std(xs: list[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (0 for one value)."""
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def beyond_spread(better: dict[int, float], worse: dict[int, float], higher_is_better: bool,
                  as_expected: str) -> dict:
  """Is `better` (seed -> value) ahead of `worse` beyond the seed spread?

  Resolved means the two mean ± std intervals do not overlap (never with fewer than two
  seeds). Seeds are paired (seed k gives both rows the same data order), so the per-seed
  differences are counted too. gap > 0 means `better` is ahead.
  """
  sign = 1 if higher_is_better else -1
  (a, a_std), (b, b_std) = mean_std(list(better.values())), mean_std(list(worse.values()))
  gap, spread = sign * (a - b), a_std + b_std
  diffs = [sign * (better[s] - worse[s]) for s in worse if s in better]
  if min(len(better), len(worse)) < 2 or abs(gap) <= spread:
    verdict = 'not resolved'
  else:
    verdict = as_expected if gap > 0 else 'resolved, the opposite'
  return dict(gap=gap, spread=spread, verdict=verdict, seeds_agreeing=sum(d > 0 for d in diffs),
              seeds=len(diffs), paired_mean=statistics.fmean(diffs) if diffs else math.nan,
              paired_std=statistics.stdev(diffs) if len(diffs) > 1 else 0.0)
