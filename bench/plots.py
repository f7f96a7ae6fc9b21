"""The benchmark suite's PNG plots: throughput by write size, round-trip latency distributions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt

COLOURS = {"direct": "#4c72b0", "socat": "#dd8452", "xsockd": "#55a868",
           "xsockd-base": "#8c8c8c"}


def _size_label(n: int) -> str:
    return f"{n >> 20} MiB" if n >= 1 << 20 else (f"{n >> 10} KiB" if n >= 1024 else f"{n} B")


def plot_all(res: dict[str, object], samples: dict[str, dict[str, list[float]]],
             machine: dict[str, object], out: Path) -> None:
    note = f"{machine['cpu']}, {machine['cpus']} CPUs, commit {machine['commit']}"
    tput: dict[str, dict[str, float]] = res["throughput_mb_s"]  # type: ignore[assignment]
    streams: dict[str, float] = res["streams_mb_s"]  # type: ignore[assignment]
    groups = [f"one stream\n{_size_label(int(s))} writes" for s in tput]
    groups.append("many streams\n64 KiB writes")
    values = [*tput.values(), streams]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = [p for p in COLOURS if p in streams]
    width = 0.8 / len(names)
    for i, path in enumerate(names):
        xs = [g + (i - (len(names) - 1) / 2) * width for g in range(len(groups))]
        ax.bar(xs, [v[path] for v in values], width, label=path, color=COLOURS[path])
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylabel("MB/s")
    ax.set_title("Throughput (median of interleaved runs)")
    ax.legend()
    fig.text(0.01, 0.01, note, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "throughput.png", dpi=90)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(samples), figsize=(9, 4), sharey=True)
    for ax, (size, by_path) in zip(axes, samples.items(), strict=True):
        for path, xs in by_path.items():
            s = sorted(xs)
            ax.plot(s, [(i + 1) / len(s) for i in range(len(s))], label=path,
                    color=COLOURS[path])
        ax.set_xscale("log")
        ax.set_xlabel("round trip (us, log scale)")
        ax.set_title(f"Round trip, {_size_label(int(size))}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("fraction of round trips at most x")
    axes[0].legend()
    fig.text(0.01, 0.01, note, fontsize=7)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(out / "latency.png", dpi=90)
    plt.close(fig)
