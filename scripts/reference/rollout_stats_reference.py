"""Reference values for the rollout analysis statistics (registry/src/server/rollouts/analysis.rs).

Run with scipy and statsmodels installed; the printed values are recorded in the unit tests of
analysis.rs. CI does not run this script.

    python3 scripts/reference/rollout_stats_reference.py
"""

import math


def f(v):
    return repr(float(v))


import numpy as np
from scipy import stats
from statsmodels.stats.proportion import (
    confint_proportions_2indep,
    proportion_confint,
    proportions_ztest,
)

print("z_for(0.95) =", f(stats.norm.ppf(0.95)))
print("z_for(0.99) =", f(stats.norm.ppf(0.99)))

# Wilson score interval, one-sided level 0.95 each side (alpha 0.10 two-sided).
for x, n in [(7, 250), (0, 600)]:
    lo, hi = proportion_confint(x, n, alpha=0.10, method="wilson")
    print(f"wilson({x}, {n}) =", f(lo), f(hi))

# Newcombe's hybrid score interval for p1 - p2 and the pooled z-test, canary first.
for x1, n1, x2, n2 in [(40, 2000, 20, 2000), (8, 200, 30, 1000), (0, 600, 0, 1200)]:
    lo, hi = confint_proportions_2indep(
        x1, n1, x2, n2, method="newcomb", compare="diff", alpha=0.10
    )
    if x1 + x2 > 0:
        _, p_larger = proportions_ztest([x1, x2], [n1, n2], alternative="larger")
        _, p_smaller = proportions_ztest([x1, x2], [n1, n2], alternative="smaller")
    else:
        p_larger = p_smaller = float("nan")
    print(
        f"two_proportions({x1}, {n1}, {x2}, {n2}) =",
        f(lo), f(hi), f(p_larger), f(p_smaller),
    )

# Fisher's exact test (few expected errors), canary 2/50 against stable 10/950.
g = stats.fisher_exact([[2, 48], [10, 940]], alternative="greater").pvalue
l = stats.fisher_exact([[2, 48], [10, 940]], alternative="less").pvalue
print("fisher(2, 50, 10, 950) p_greater =", f(g), "p_less =", f(l))

# Mann-Whitney U with ties, asymptotic, continuity-corrected.
x = [1, 1, 2, 2, 2, 3, 5, 8, 8, 9]
y = [1, 2, 2, 3, 3, 4, 4, 4, 6, 7, 7, 7]
g = stats.mannwhitneyu(x, y, alternative="greater", method="asymptotic", use_continuity=True)
l = stats.mannwhitneyu(x, y, alternative="less", method="asymptotic", use_continuity=True)
print("mann_whitney U =", f(g.statistic), "p_greater =", f(g.pvalue), "p_less =", f(l.pvalue))

# Welch's t-test and its one-sided-0.95 (two-sided 0.90) interval.
a = [0.7, 0.8, 0.6, 0.9, 0.7, 0.8, 0.5, 0.9]
b = [0.6, 0.5, 0.7, 0.6, 0.4, 0.6, 0.5, 0.7, 0.6, 0.5]
r = stats.ttest_ind(a, b, equal_var=False, alternative="greater")
ci = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.90)
print("welch p_greater =", f(r.pvalue), "interval =", f(ci.low), f(ci.high))
print("  sums", len(a), sum(a), sum(v * v for v in a), len(b), sum(b), sum(v * v for v in b))

# Hodges-Lehmann shift of log values and the Moses interval at one-sided 0.95.
x = np.array([10.0, 12.0, 15.0, 20.0, 30.0])
y = np.array([9.0, 11.0, 14.0])
d = np.sort((np.log(x)[:, None] - np.log(y)[None, :]).ravel())
n1, n2 = len(x), len(y)
N = n1 * n2
k = N / 2 - stats.norm.ppf(0.95) * math.sqrt(n1 * n2 * (n1 + n2 + 1) / 12)
q = k / N
lo = d[math.ceil(q * N) - 1]
hi = d[math.ceil((1 - q) * N) - 1]
print("hodges_lehmann ratio =", f(math.exp(np.median(d))), "interval =", f(math.exp(lo)), f(math.exp(hi)))
