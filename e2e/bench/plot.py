"""Plots latency percentiles per contender from the CSV latency.sh writes (not a test).

    .venv/bin/python e2e/bench/plot.py CSV PNG
"""
import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(src: str, dst: str) -> None:
    rows = list(csv.DictReader(open(src)))
    rates = sorted({int(r["rate"]) for r in rows})
    contenders = list(dict.fromkeys(r["contender"] for r in rows))
    quantiles = ["p50_us", "p90_us", "p99_us", "p999_us"]
    fig, axes = plt.subplots(1, len(rates), figsize=(6 * len(rates), 4.5), squeeze=False)
    width = 0.8 / len(contenders)
    for ax, rate in zip(axes[0], rates):
        for i, c in enumerate(contenders):
            row = next((r for r in rows if r["contender"] == c and int(r["rate"]) == rate), None)
            if row is None:
                continue
            xs = [q + i * width for q in range(len(quantiles))]
            ax.bar(xs, [float(row[q]) for q in quantiles], width, label=c)
        ax.set_xticks([q + width * (len(contenders) - 1) / 2 for q in range(len(quantiles))])
        ax.set_xticklabels(["p50", "p90", "p99", "p99.9"])
        ax.set_yscale("log")
        ax.set_ylabel("latency (µs, log scale)")
        ax.set_title(f"HTTP/1.1 keep-alive at {rate} req/s (oha, latency-corrected)")
        ax.grid(axis="y", which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
