"""The README's benchmark tables, generated from ``benchmarks/results/*.json`` and never typed.

Each generated block sits between ``<!-- generated:NAME -->`` and ``<!-- /generated:NAME -->``
in README.md. ``python benchmarks/readme.py`` rewrites every block from the committed JSONs;
``--check`` exits 1 (naming the stale blocks) when the README differs from what the JSONs give,
which ``tests/benchmarks/test_readme.py`` runs, so a hand-edited figure or a results file
committed without its table fails the test suite.

Every block starts with where its figures come from: the results file, the date, and the load
average before and after the run (the machine is shared; the load says how far to trust a
timing). Every results file is benchlib's envelope (``benchlib.ENVELOPE_KEYS``): the run's
provenance at the top, the script's figures under ``result``. The renderers are pure functions
of the parsed JSON, so they are tested on hand-made reports. Benchmarks that write several JSONs
for one table (serving at two weight kinds) list them all.

Usage: python benchmarks/readme.py [--check] [--readme README.md] [--results benchmarks/results]
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import quality  # sibling module: benchmarks/ is first on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RESULTS = REPO / "benchmarks" / "results"

Report = Dict[str, Any]


class ReadmeError(RuntimeError):
    """The README lacks a block's markers, or a block's results file is missing or malformed."""


def begin_marker(name: str) -> str:
    return f"<!-- generated:{name} (benchmarks/readme.py; edit the JSON, not this block) -->"


def end_marker(name: str) -> str:
    return f"<!-- /generated:{name} -->"


# --------------------------------------------------------------------------------------
# Formatting helpers
# --------------------------------------------------------------------------------------
def num(value: Any, digits: int = 3) -> str:
    """A figure, or "-" when it was not measured (None / NaN)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def met_cell(met: Optional[bool]) -> str:
    return "not measured" if met is None else ("yes" if met else "**no**")


def figure(value: Any) -> str:
    """A bar's value or target: 4 decimals below 100, 1 above, text as it is."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return num(value)
    return f"{value:,.1f}" if abs(value) >= 100 else f"{value:.4g}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> List[str]:
    return (["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
            + ["| " + " | ".join(r) + " |" for r in rows])


def load_pair(report: Report) -> Tuple[Optional[float], Optional[float]]:
    """The 1-minute load average before and after a run (benchlib's envelope keys)."""
    before, after = report.get("load_avg_before"), report.get("load_avg_after")
    return (before[0] if before else None), (after[0] if after else None)


def provenance(file: str, report: Report) -> str:
    before, after = load_pair(report)
    load = (f"load average {num(before, 2)} before, {num(after, 2)} after" if after is not None
            else f"load average {num(before, 2)} at the start" if before is not None
            else "load average not recorded")
    cores = (report.get("machine") or {}).get("cores")
    where = f"{cores} cores, " if cores else ""
    probe = (report.get("cpu_probe_s_before"), report.get("cpu_probe_s_after"))
    speed = (f"; CPU probe {num(probe[0], 2)} s before, {num(probe[1], 2)} s after, "
             f"steal {num(report.get('cpu_steal_pct'), 1)} %" if probe[0] is not None else "")
    return (f"`benchmarks/results/{file}`, measured {str(report.get('date', '?'))[:10]} "
            f"({where}{load}{speed}).")


def bar_rows(file: str, report: Report) -> List[List[str]]:
    return [[f"`{b['name']}`", figure(b.get("value")), figure(b.get("target")),
             met_cell(None if b.get("value") is None else b.get("met")), file]
            for b in report.get("bars") or []]


# --------------------------------------------------------------------------------------
# Renderers: parsed JSON(s) -> Markdown lines
# --------------------------------------------------------------------------------------
def render_bars(reports: Dict[str, Report]) -> List[str]:
    """Every bar of every results file in one table."""
    rows = [r for file in sorted(reports) for r in bar_rows(file, reports[file])]
    return table(("bar", "value", "target", "met", "results file"), rows)


def _build_seconds(side: Dict[str, Any]) -> str:
    """The median run's seconds, and every run's when the side was repeated."""
    runs = side.get("runs") or []
    each = "; runs " + " / ".join(f"{r['seconds']:.1f}" for r in runs) if len(runs) > 1 else ""
    return f"{side['seconds']:.1f} s{each}"


def render_build(reports: Dict[str, Report]) -> List[str]:
    (file, r), = reports.items()
    rows = []
    for x in r["result"]["by_size"]:
        s, p = x["spark"], x["pandas"]
        equal = x.get("outputs_equal", {})
        rows.append([
            f"{x['events']:,} ({x['users']:,} users, {x['items']:,} items)",
            f"{s['events_per_s']:,.0f} ({_build_seconds(s)}; + {s.get('startup_s', 0):.1f} s JVM "
            f"start)",
            f"{s['peak_rss_mb']:,.0f} MB", f"{p['events_per_s']:,.0f} ({_build_seconds(p)})",
            f"{p['peak_rss_mb']:,.0f} MB", f"{x['ratio_events_per_s_spark_over_pandas']:.2f}x",
            f"{x['ratio_peak_rss_spark_over_pandas']:.2f}x",
            "yes" if equal and all(equal.values()) else "**no**",
            num(s.get("mean_load_avg_1m"), 1)])
    repeats = (r["result"].get("config") or {}).get("repeats", 1)
    how = ([f"Each side ran {repeats} times, alternating: events/s from the median run, peak RSS "
            "the highest run's.", ""] if repeats > 1 else [])
    return [provenance(file, r), ""] + how + table(
        ("events", "Spark events/s", "Spark peak RSS", "pandas events/s", "pandas peak RSS",
         "Spark / pandas throughput", "Spark / pandas peak RSS", "outputs equal",
         "load during run"), rows)


def _mean_std(summary: Dict[str, Any], key: str) -> str:
    mean, std = summary[key + "_mean"], summary.get(key + "_std")
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def stage_lines(result: Dict[str, Any]) -> List[str]:
    """One line per stage a staged benchmark ran: when, the load around it, its wall time."""
    return [f"- `{s['command']}` on {s['date'][:10]}: load average {num(s['load_before'][0], 2)} "
            f"before, {num(s['load_after'][0], 2)} after, {s['wall_s'] / 60:.0f} min wall."
            for s in result.get("stages_run", [])]


def render_movielens(reports: Dict[str, Report]) -> List[str]:
    (file, report), = reports.items()
    r = report["result"]
    rows = []
    for dataset, ds in r.get("datasets", {}).items():
        for name, entry in ds.get("models", {}).items():
            s = entry.get("summary")
            if not s:
                continue
            rows.append([dataset, entry.get("label", name), f"{s['lr']:g}", _mean_std(s, "hr@10"),
                         _mean_std(s, "ndcg@10"), f"{s['wall_to_best_s_mean']:.0f}",
                         f"{s['cpu_to_best_s_mean']:.0f}",
                         f"{s['epochs_run_mean']:.1f} ({s['best_epoch_mean']:.1f})", str(s["n_seeds"])])
    head = [f"`benchmarks/results/{file}`, run in stages (each run records its own load average):"]
    head += stage_lines(r) + ([f"Note: {r['note']}"] if r.get("note") else []) + [""]
    runs = ["", "Every run so far (the learning-rate grid at seed 0, then the other seeds):", ""]
    runs += table(("data set", "model", "lr", "seed", "HR@10", "NDCG@10", "val NDCG@10",
                   "best epoch (run)", "load before -> after"), run_rows(r))
    if not rows:
        return head + ["No model has a seed summary under the converged protocol yet."] + runs
    return head + table(
        ("data set", "model", "lr", "HR@10 (mean ± sd)", "NDCG@10 (mean ± sd)", "wall s to best",
         "CPU s to best", "epochs run (best)", "seeds"), rows) + runs


def run_rows(result: Dict[str, Any]) -> List[List[str]]:
    """One row per finished MovieLens run (grid and seeds), in the order the JSON holds them."""
    out = []
    for dataset, ds in result.get("datasets", {}).items():
        for name, entry in ds.get("models", {}).items():
            for x in list(entry.get("grid", {}).values()) + list(entry.get("seeds", {}).values()):
                out.append([dataset, entry.get("label", name), f"{x['lr']:g}", str(x["seed"]),
                            f"{x['hr@10']:.4f}", f"{x['ndcg@10']:.4f}", f"{x['val']['ndcg@10']:.4f}",
                            f"{x['best_epoch']} ({x['epochs_run']})",
                            f"{num(x['load_before'][0], 2)} -> {num(x['load_after'][0], 2)}"])
    return out


def render_training(reports: Dict[str, Report]) -> List[str]:
    (file, report), = reports.items()
    r = report["result"]
    rows = []
    for label, fig in (("plain torch", r["baseline"]["plain_torch"]),
                       ("Lightning", r["figures"]["lightning"])):
        runs = " / ".join(f"{x['examples_per_s']:,.0f}" for x in fig["runs"])
        rows.append([label, f"{fig['median_examples_per_s']:,.0f}", runs])
    return ([provenance(file, report), ""] + table(("loop", "examples/s (median)", "runs"), rows)
            + ["", f"Time ratio Lightning / plain: {r['ratio_time_lightning_over_plain']:.2f} "
                   f"(bar <= {r['max_ratio']:g}: {met_cell(r['passed'])})."])


def render_batch_inference(reports: Dict[str, Report]) -> List[str]:
    (file, r), = reports.items()
    x = r["result"]
    base = x["baseline"]["total_s"]
    rows = [["plain torch loop (read + encode)", f"{base:.1f}", f"{x['baseline']['users_per_s']:,.0f}",
             "1.00x"],
            [f"Spark, first run ({x['spark_first']['encoded']:,} users encoded)",
             f"{x['spark_first']['seconds']:.1f}", f"{x['spark_first']['users_per_s']:,.0f}",
             f"{x['spark_first']['seconds'] / base:.2f}x"],
            ["Spark, new model version (every state re-encoded)",
             f"{x['spark_new_version']['seconds']:.1f}", f"{x['spark_new_version']['users_per_s']:,.0f}",
             f"{x['spark_new_version']['seconds'] / base:.2f}x"],
            ["Spark, rerun with nothing new", f"{x['spark_noop_rerun']['seconds']:.1f}",
             f"- ({x['spark_noop_rerun']['encoded']} encoded, committed: "
             f"{num(x['spark_noop_rerun']['committed'])})", "-"]]
    return ([provenance(file, r), ""]
            + table(("run", "seconds", "users/s", "time vs plain loop"), rows)
            + ["", f"{x['users']:,} users, mean history length {x['mean_history_len']}, states equal to the "
                   f"plain loop's within {x['max_abs_state_diff']} (max abs difference); target: at "
                   f"most {x['target_ratio_max']}x the plain loop's time."])


def _ms(stage: Optional[Dict[str, Any]], *keys: str) -> str:
    if not stage:
        return "-"
    return " / ".join(num(stage.get(k), 2) for k in keys)


def index_cell(params: Optional[Dict[str, Any]]) -> str:
    """ScaNN's shape and search knobs: shards x leaves searched / leaves, candidates reordered."""
    if not params:
        return "-"
    return (f"{params.get('shards', 1)} x {params['leaves_to_search']}/{params['num_leaves']} "
            f"leaves, {params['pre_reorder_num_neighbors']:,} reordered")


def render_serving(reports: Dict[str, Report]) -> List[str]:
    rows = []
    for file, r in reports.items():
        for x in r["result"]["by_size"]:
            inproc = x.get("in_process_scann", {})
            search = x.get("search_only", {})
            head = x.get("head_only", {})
            http = x.get("http") or {}
            rows.append([
                f"{x['n_items']:,}", r["result"].get("model_weights", "-").split(" (")[0],
                _ms(inproc.get("total_ms"), "p50", "p99", "p999"),
                " / ".join(_ms(inproc.get(f"{s}_ms"), "p50") for s in ("feast", "head", "search")),
                _ms(head.get("numpy_ms"), "p50"),
                (f"{_ms(search.get('scann_ms'), 'p50')} vs {_ms(search.get('brute_force_ms'), 'p50')} ms: "
                 f"{num(search.get('speedup_p50'), 1)}x"),
                num(search.get("recall_at_100"), 3), index_cell(x["index"].get("scann_params")),
                _ms(http.get("client_ms"), "p50", "p99"), file])
    out = [provenance(f, r) for f, r in reports.items()] + [""]
    return out + table(("items", "weights", "in-process p50 / p99 / p99.9 ms",
                        "stage p50 ms (feast / head / search)", "head alone p50 ms",
                        "ScaNN vs exact search p50", "recall@100", "index (per shard)",
                        "HTTP p50 / p99 ms (Python client)",
                        "results file"), rows) + render_layouts(reports)


def render_layouts(reports: Dict[str, Report]) -> List[str]:
    """The sharded index beside one searcher, per run that measured both."""
    rows = []
    for file, r in reports.items():
        for x in r["result"]["by_size"]:
            for lay in x.get("index_layouts") or []:
                rows.append([f"{x['n_items']:,}", r["result"].get("model_weights", "-").split(" (")[0],
                             lay["layout"], index_cell(lay["scann_params"]),
                             _ms(lay["search_ms"], "p50", "p99"), num(lay["recall_at_100"], 3), file])
    if not rows:
        return []
    return ["", "Index layouts, one query at a time on the same held-out queries:", ""] + table(
        ("items", "weights", "layout", "index (per shard)", "search p50 / p99 ms", "recall@100",
         "results file"), rows)


def render_load_test(reports: Dict[str, Report]) -> List[str]:
    (file, r), = reports.items()
    setup = r["result"]["setup"]
    rows = []
    for phase, x in r["result"]["phases"].items():
        lat = x["latency_ms"]
        rss = x.get("server_rss", {})
        rows.append([phase, f"`{x['command']}`", f"{x['requests']:,}", str(x["error_count"]),
                     f"{x['throughput_rps']:,.0f}",
                     f"{lat['p50']:.2f} / {lat['p99']:.2f} / {lat['p999']:.2f} / {lat['max']:.1f}",
                     f"{num(rss.get('growth_mb'), 1)} MB"])
    return ([provenance(file, r),
             f"{setup['n_items']:,} items (index recall@100 {setup['index_recall_at_100']}, "
             f"{index_cell(setup.get('index_scann_params'))}, search threads per request: "
             f"{setup.get('search_threads', 1)}), "
             f"{setup['users_with_state']:,} users with a state, server: {setup['server']}, "
             f"online store: {setup['online_store']}, client: {setup['client']}.", ""]
            + table(("phase", "client", "requests", "errors", "req/s",
                     "latency ms p50 / p99 / p99.9 / max", "server RSS growth"), rows))


def render_refresh(reports: Dict[str, Report]) -> List[str]:
    (file, r), = reports.items()
    x = r["result"]
    steps = ("build_sequences", "batch_inference", "feast_export", "materialize")

    def row(run: Dict[str, Any], label: str) -> List[str]:
        appended = run.get("appended") or {}
        return ([f"{label} ({run['clean_events']:,})", num(appended.get("events")),
                 num(run["users_reencoded"])]
                + [f"{run['seconds'][s]:.1f}" for s in steps]
                + [f"{run['total_s']:.1f}", num(run.get("peak_rss_mb"))])

    fills = [row(f["first_fill"], f"{f['users']:,} users: first fill, {f['date'][:10]}, "
                                  f"generated in {f['generate_s']:.0f} s") for f in x["fills"]]
    rows = fills + [row(run, run["label"]) for run in x["runs"]]
    return ([provenance(file, r),
             f"Lakes of {', '.join(f'{n:,}' for n in x['sizes'])} users, {x['items']:,} items "
             f"each, Spark `{x['master']}`, driver memory {x['driver_memory']}; same absolute "
             f"increment: {x['same_increment_events']:,} events; the first fills ran once, "
             f"earlier (their date in the row).", ""]
            + table(("run (clean events in the lake)", "appended events", "users re-encoded")
                    + tuple(f"{s} s" for s in steps) + ("total s", "peak RSS MB"), rows))


def render_quality(reports: Dict[str, Report]) -> List[str]:
    (_, r), = reports.items()
    return quality.render_readme(r).splitlines()


@dataclass(frozen=True)
class Block:
    """A generated README block: its name, the results files it reads, its renderer."""

    name: str
    files: Tuple[str, ...]
    render: Callable[[Dict[str, Report]], List[str]]


BLOCKS: Tuple[Block, ...] = (
    Block("quality", ("quality.json",), render_quality),
    Block("build_sequences", ("build_sequences.json",), render_build),
    Block("movielens", ("movielens.json",), render_movielens),
    Block("training", ("training.json",), render_training),
    Block("batch_inference", ("batch_inference.json",), render_batch_inference),
    Block("serving", ("serving.json", "serving_trained.json"), render_serving),
    Block("load_test", ("load_test.json",), render_load_test),
    Block("refresh", ("refresh.json",), render_refresh),
)
BARS_BLOCK = "bars"  # every bar of every results file


# --------------------------------------------------------------------------------------
# README I/O
# --------------------------------------------------------------------------------------
def read_reports(results: Path, files: Sequence[str]) -> Dict[str, Report]:
    out = {}
    for file in files:
        path = results / file
        if not path.exists():
            raise ReadmeError(f"{path} is missing: run its benchmark (see the README) first")
        try:
            out[file] = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ReadmeError(f"{path} is not valid JSON: {err}") from err
    return out


def render_all(results: Path) -> Dict[str, str]:
    """Block name -> its Markdown (without markers)."""
    out = {}
    for block in BLOCKS:
        try:
            out[block.name] = "\n".join(block.render(read_reports(results, block.files)))
        except (KeyError, TypeError, ValueError) as err:
            raise ReadmeError(f"block {block.name}: {', '.join(block.files)} lacks what the table "
                              f"needs ({type(err).__name__}: {err})") from err
    every = read_reports(results, sorted(p.name for p in results.glob("*.json")))
    out[BARS_BLOCK] = "\n".join(render_bars(every))
    return out


def replace_block(text: str, name: str, body: str) -> str:
    begin, end = begin_marker(name), end_marker(name)
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ReadmeError(f"README must hold exactly one {begin!r} ... {end!r} pair")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{body}\n{end}{tail}"


def updated(text: str, blocks: Dict[str, str]) -> str:
    for name, body in blocks.items():
        text = replace_block(text, name, body)
    return text


def stale_blocks(text: str, blocks: Dict[str, str]) -> List[str]:
    return [name for name, body in blocks.items() if replace_block(text, name, body) != text]


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true",
                   help="exit 1 if a generated block differs from what the JSONs give")
    p.add_argument("--readme", type=Path, default=README)
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    try:
        blocks = render_all(args.results)
        text = args.readme.read_text()
        if args.check:
            stale = stale_blocks(text, blocks)
            if stale:
                print(f"stale README blocks: {', '.join(stale)} (run python benchmarks/readme.py)")
                return 1
            print("README blocks match the results JSONs")
            return 0
        new = updated(text, blocks)
    except ReadmeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if new != text:
        args.readme.write_text(new)
        print(f"rewrote {args.readme}")
    else:
        print("README already current")
    return 0


if __name__ == "__main__":
    sys.exit(main())
