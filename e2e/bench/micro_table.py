"""Prints the criterion results under target/criterion as a Markdown table (not a test).

    python3 e2e/bench/micro_table.py target/criterion
"""
import json
import pathlib
import sys


def fmt(ns: float) -> str:
    if ns < 1_000:
        return f"{ns:.0f} ns"
    if ns < 1_000_000:
        return f"{ns / 1_000:.2f} µs"
    return f"{ns / 1_000_000:.2f} ms"


def main(root: str) -> None:
    rows = []
    for est in sorted(pathlib.Path(root).glob("**/new/estimates.json")):
        bench = json.loads((est.parent / "benchmark.json").read_text())
        mean = json.loads(est.read_text())["mean"]
        rows.append((bench["full_id"], mean["point_estimate"], mean["confidence_interval"]))
    print("| benchmark | mean | 95 % interval |")
    print("|---|---|---|")
    for name, point, ci in rows:
        print(f"| {name} | {fmt(point)} | {fmt(ci['lower_bound'])} – {fmt(ci['upper_bound'])} |")
    pick = [p for n, p, _ in rows if n.startswith("pick/") and n.endswith("/1000")]
    if pick:
        worst = max(pick)
        verdict = "holds" if worst <= 1000 else "does not hold"
        print(f"\nGoal: balancer pick ≤ 1 µs at 1000 endpoints: {verdict} (slowest algorithm {fmt(worst)}).")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "target/criterion")
