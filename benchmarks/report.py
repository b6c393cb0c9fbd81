"""Tables (plain text for the terminal, Markdown for the README) and the issue's targets as ratios.

Every target is a ratio of two figures measured in the same run on the same machine.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Level = dict[str, Any]

TARGET_CONCURRENCY = 64  # the concurrency for the batching and plain-FastAPI comparisons


def find_level(levels: list[Level], scenario: str, server: str, concurrency: int) -> Level | None:
    for level in levels:
        if (level["scenario"], level["server"], level["concurrency"]) == (scenario, server, concurrency):
            return level
    return None


def best_level(levels: list[Level], scenario: str, server: str, key: str) -> Level | None:
    """The level with the highest `key` (the server's capacity across the sweep).

    Only levels without errors qualify, unless every level had some: a throughput bought by refusing
    or timing out part of the load is not a capacity.
    """
    candidates = [lv for lv in levels if (lv["scenario"], lv["server"]) == (scenario, server)]
    clean = [lv for lv in candidates if not lv["errors"]]
    return max(clean or candidates, key=lambda lv: lv[key], default=None)


def _at(level: Level | None) -> str:
    if level is None:
        return ""
    return f" @ c={level['concurrency']}" + (" (with errors)" if level["errors"] else "")


def _ratio(numerator: float | None, denominator: float | None) -> float | None:
    if numerator is None or not denominator:
        return None
    return round(numerator / denominator, 3)


def _target(name: str, ratio: float | None, target: float, strict: bool, measured: str,
            baseline: str) -> dict[str, Any]:
    met = None if ratio is None else (ratio > target if strict else ratio >= target)
    return {"target": name, "ratio": ratio, "goal": f"{'>' if strict else '>='} {target:g}", "met": met,
            "measured": measured, "baseline": baseline}


def _raw(level: Level | None, key: str) -> float | None:
    """The raw in-process figure measured right before this level (see load_benchmark.raw_adjacent)."""
    return None if level is None else level.get("raw_adjacent", {}).get(key)


def targets(levels: list[Level]) -> list[dict[str, Any]]:
    """The four targets of the issue (the plain-FastAPI one in two rows: throughput and p99).

    The runtime baselines of the last two are the raw figures measured right before the level that
    is compared (the same minute of machine load), at the level where the service did best.
    """
    c = TARGET_CONCURRENCY
    out = []
    on = find_level(levels, "encode-1", "batching-on", c)
    off = find_level(levels, "encode-1", "batching-off", c)
    plain = find_level(levels, "encode-1", "plain", c)

    def rps(level: Level | None) -> float | None:
        return None if level is None else level["requests_per_s"]

    def p99(level: Level | None) -> float | None:
        return None if level is None else level["p99_ms"]

    out.append(_target(f"batching on vs off (max_batch_size=1): encode-1 throughput @ c={c}",
                       _ratio(rps(on), rps(off)), 1.3, False,
                       f"{rps(on)} req/s", f"{rps(off)} req/s"))
    out.append(_target(f"service vs plain FastAPI + ONNX per request: encode-1 throughput @ c={c}",
                       _ratio(rps(on), rps(plain)), 1.5, False, f"{rps(on)} req/s", f"{rps(plain)} req/s"))
    out.append(_target(f"service vs plain FastAPI: encode-1 p99 latency @ c={c} (plain p99 / service p99)",
                       _ratio(p99(plain), p99(on)), 1.0, True, f"{p99(on)} ms", f"{p99(plain)} ms"))

    enc = best_level(levels, "encode-64", "batching-on", "images_per_s")
    raw_enc = _raw(enc, "images_per_s")
    out.append(_target("encode-64: HTTP images/s (best concurrency) vs raw in-process encoder at batch 64",
                       _ratio(enc and enc["images_per_s"], raw_enc), 0.7, False,
                       f"{enc and enc['images_per_s']} images/s{_at(enc)}",
                       f"{raw_enc} images/s (raw, batch 64)"))

    ll = best_level(levels, "loglik-k1000", "batching-on", "samples_per_s")
    raw_ll = _raw(ll, "samples_per_s")
    out.append(_target("log-likelihood k=1000: images/s x k (best concurrency) vs raw log_weights samples/s "
                       "at the service's batch shape",
                       _ratio(ll and ll["samples_per_s"], raw_ll), 0.8, False,
                       f"{ll and ll['samples_per_s']} samples/s{_at(ll)}",
                       f"{raw_ll} samples/s (raw)"))
    return out


# -- tables -------------------------------------------------------------------------------------------------
LEVEL_COLUMNS = ("scenario", "server", "conc", "ok", "errors", "req/s", "img/s", "samples/s", "p50 ms",
                 "p90 ms", "p99 ms", "srv cpu", "srv wait", "cli cpu", "batch rows", "dev busy", "vs raw",
                 "load1")
LEVEL_WIDTHS = (12, 12, 4, 5, 10, 7, 7, 9, 7, 7, 7, 7, 8, 7, 10, 8, 6, 5)  # for rows printed as they come


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 1000:
            return f"{value:,.0f}"
        return f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    return str(value)


def level_row(level: Level) -> list[str]:
    errors = ", ".join(f"{k}x{v}" for k, v in sorted(level["errors"].items())) or "0"
    graph = "log_weights" if level["scenario"].startswith("loglik") else "encoder"
    batching = level.get("batching", {}).get(graph, {})
    return [level["scenario"], level["server"], str(level["concurrency"]), str(level["ok"]), errors,
            _fmt(level["requests_per_s"]), _fmt(level["images_per_s"]), _fmt(level.get("samples_per_s")),
            _fmt(level["p50_ms"]), _fmt(level["p90_ms"]), _fmt(level["p99_ms"]),
            _fmt(level["server_cpu_cores"]), _fmt(level.get("server_cpu_wait_cores")),
            _fmt(level["client_cpu_cores"]),
            _fmt(batching.get("mean_batch_rows")), _fmt(batching.get("device_busy")),
            _fmt(level.get("ratio_to_raw")),
            _fmt(level["load_average_after"][0])]


def target_row(t: dict[str, Any]) -> list[str]:
    met = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
    return [t["target"], _fmt(t["ratio"]), t["goal"], met, t["measured"], t["baseline"]]


TARGET_COLUMNS = ("target", "ratio", "goal", "result", "measured", "baseline")


def fixed_row(cells: Sequence[str], widths: Sequence[int] = LEVEL_WIDTHS) -> str:
    return "  ".join(f"{c:<{w}}" for c, w in zip(cells, widths, strict=True)).rstrip()


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*headers), line, *(fmt.format(*row) for row in rows)])


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def esc(cell: str) -> str:
        return str(cell).replace("|", "\\|")

    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(esc(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def raw_rows(raw: dict[str, Any]) -> list[list[str]]:
    rows = []
    for label, measured in (("before", raw["before"]), ("after", raw.get("after"))):
        if not measured:
            continue
        for b, r in measured["encoder"].items():
            rows.append([label, f"encoder batch {b}", f"{r['images_per_s']:,.0f} images/s",
                         f"{r['ms_per_batch']} ms"])
        for rows_, r in measured["log_weights"].items():
            rows.append([label, f"log_weights {rows_} x {r['chunk']} samples",
                         f"{r['samples_per_s']:,.0f} samples/s", f"{r['ms_per_batch']} ms"])
    return rows


RAW_COLUMNS = ("pass", "graph and batch", "throughput", "per batch")
CEILING_COLUMNS = ("conc", "req/s", "p50 ms", "client CPU ms/request", "errors")


def ceiling_rows(ceiling: list[dict[str, Any]]) -> list[list[str]]:
    return [[str(c["concurrency"]), _fmt(c["requests_per_s"]), _fmt(c["p50_ms"]),
             _fmt(c["client_cpu_ms_per_request"]), str(sum(c["errors"].values()))] for c in ceiling]


BATCHING_KEYS = ("runtime", "device", "threads", "max_batch_size", "max_queue_delay_ms", "max_queue_size",
                 "iw_chunk_size", "max_batch_samples", "log_weights_batch_rows", "request_timeout_s")


def _batching(settings: dict[str, Any] | None) -> str:
    if not settings:
        return "-"
    return ", ".join(f"{k}={settings[k]}" for k in BATCHING_KEYS if k in settings)


def markdown_report(result: dict[str, Any]) -> str:
    m, s = result["machine"], result["settings"]
    levels = result["levels"]
    lines = [
        f"# Load benchmark: {result['model']['name']} version {result['model']['version']}"
        + (" (quick smoke run)" if result["quick"] else ""),
        "",
        *([f"> {result['note']}", ""] if result.get("note") else []),
        f"- model: `{result['model']['dir']}` ({result['model']['architecture']}, latent "
        f"{result['model']['latent_dim']}, exported {result['model']['created_at']})",
        f"- machine: {m['cpu_model']}, {m['cores']} cores, {m['memory_gib']} GiB"
        + (f", GPU: {', '.join(m['gpus'])}" if m["gpus"] else ", no GPU"),
        f"- load average (1/5/15 min) at start {result['load_average_start']}, at end "
        f"{result['load_average_end']}; other work on the machine at start: "
        + ("; ".join(f"`{p}`" for p in m["busiest_processes"][:3]) or "none"),
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
        f"- command: `{m['command']}`; git {m['git_commit']}",
        f"- settings: input form {s['input_form']}, {s['seconds_per_level']} s or "
        f"{s['requests_per_level']} requests per level (whichever first), levels interleaved across "
        f"servers; service (batching-on): {_batching(s['service_settings'].get('batching-on'))}",
        "",
        "Columns: `srv cpu`/`cli cpu` = CPU cores used by the server / the load generator during the "
        "level; `srv wait` = cores' worth of time the server's threads were runnable but waiting for a CPU "
        "(from /proc schedstat: the machine's other load); `batch rows` = mean rows per executed batch; "
        "`dev busy` = share of the level the device "
        "thread spent in `session.run`; `vs raw` = img/s (encode-64) or samples/s (log-likelihood) over "
        "the raw in-process runtime figure measured just before the level; errors are non-200 answers "
        "(status x count).",
        "",
        "## Per scenario and concurrency",
        "",
        markdown_table(LEVEL_COLUMNS, [level_row(lv) for lv in levels]),
        "",
        "## Raw in-process runtime (baselines)",
        "",
        markdown_table(RAW_COLUMNS, raw_rows(result["raw"])),
        "",
        "## Load generator ceiling",
        "",
        f"GET /healthz (no model work) with the same clients ({s.get('client_mode', '?')}): the most the "
        "load generator can offer on this machine at each concurrency.",
        "",
        markdown_table(CEILING_COLUMNS, ceiling_rows(result.get("load_generator_ceiling", []))),
        "",
        "## Targets (ratios measured in this run)",
        "",
        markdown_table(TARGET_COLUMNS, [target_row(t) for t in result["targets"]]),
        "",
    ]
    return "\n".join(lines)
