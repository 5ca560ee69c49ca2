"""``--html``: a self-contained HTML report with plots, built from the JSON report document.

This module owns the HTML page: the summary, tables (rendered here, readable without
JavaScript) and four plots drawn as inline SVG by a small script embedded in the page
(messages per second, MB/s, p50/p99 latency of end of data and of whole messages per second,
latency by percentile per phase). Rates of the last, partial second are over its real length
(a sliver too short to say anything is left out); phases whose percentile curves coincide
(MAIL, RCPT and DATA share one measurement under pipelining) are drawn once, with a note. Nothing
is loaded from anywhere: no CDN, no fonts, no images. The script marks
``<body data-charts-rendered="N">`` when it has drawn N plots, which is how a headless browser
test knows it ran; the page shows no such status. This module never measures anything and never
reads anything but the report document it is given.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = ["render_html", "write_html"]

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:0;color:#1d2330;
background:#f6f7f9}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#5b6475;margin-bottom:16px}
.cards{display:flex;flex-wrap:wrap;gap:12px}
.card{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px 14px;min-width:130px}
.card b{display:block;font-size:20px}.card span{color:#5b6475;font-size:12px}
.bad b{color:#c0392b}.good b{color:#1e8449}
table{border-collapse:collapse;background:#fff;border:1px solid #dde1e8;border-radius:8px}
th,td{padding:5px 12px;border-bottom:1px solid #eef0f4;text-align:right}
th:first-child,td:first-child{text-align:left}th{background:#f0f2f6;font-weight:600}
.chart{background:#fff;border:1px solid #dde1e8;border-radius:8px;margin:8px 0;padding:8px}
.chart svg{width:100%;height:auto;display:block}
.axis{stroke:#8a93a5;stroke-width:1}.grid{stroke:#eceff4;stroke-width:1}
.tick{fill:#5b6475;font-size:11px}.label{fill:#1d2330;font-size:12px}
.series{fill:none;stroke-width:2}.legend{font-size:12px;fill:#1d2330}
pre{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:10px;overflow:auto}
.muted{color:#5b6475}
.banner{background:#fff4e0;border:1px solid #e6b15c;border-radius:8px;padding:8px 12px;
margin:0 0 12px}
.note{color:#5b6475;font-size:13px;margin:2px 0 8px}
"""

# The plotting script: plain DOM and SVG, no library. Kept small and boring on purpose.
_JS = r"""
(function () {
  "use strict";
  var NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#2e86de", "#e67e22", "#27ae60", "#8e44ad", "#c0392b", "#16a085", "#d35400",
                "#2c3e50", "#f1c40f", "#7f8c8d", "#e84393", "#00b894", "#6c5ce7", "#fd79a8"];
  var data = JSON.parse(document.getElementById("report-data").textContent);

  function el(name, attrs, parent, text) {
    var node = document.createElementNS(NS, name);
    for (var k in attrs) { node.setAttribute(k, attrs[k]); }
    if (text !== undefined) { node.textContent = text; }
    if (parent) { parent.appendChild(node); }
    return node;
  }

  function niceTicks(lo, hi, count) {
    if (!(hi > lo)) { hi = lo + 1; }
    var step = Math.pow(10, Math.floor(Math.log10((hi - lo) / count)));
    var err = (hi - lo) / count / step;
    if (err >= 7.5) { step *= 10; } else if (err >= 3.5) { step *= 5; }
    else if (err >= 1.5) { step *= 2; }
    var ticks = [];
    for (var v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) {
      ticks.push(Math.round(v / step) * step);
    }
    return ticks;
  }

  function fmt(v) {
    if (v === 0) { return "0"; }
    var a = Math.abs(v);
    if (a >= 1e6) { return (v / 1e6).toFixed(1) + "M"; }
    if (a >= 1e4) { return (v / 1e3).toFixed(0) + "k"; }
    if (a >= 100) { return v.toFixed(0); }
    if (a >= 1) { return +v.toFixed(2) + ""; }
    return +v.toPrecision(2) + "";
  }

  // opts: {title, xLabel, yLabel, series:[{name, points:[[x,y]]}], logY, xTicks:[[x,label]]}
  function lineChart(container, opts) {
    var W = 1000, H = 360, L = 70, R = 170, T = 30, B = 46;
    var svg = el("svg", {viewBox: "0 0 " + W + " " + H, role: "img",
                         "aria-label": opts.title, "class": "plot"});
    el("text", {x: L, y: 18, "class": "label", "font-weight": "600"}, svg, opts.title);
    var xs = [], ys = [];
    opts.series.forEach(function (s) {
      s.points.forEach(function (p) { xs.push(p[0]); ys.push(p[1]); });
    });
    if (!xs.length) { xs = [0, 1]; ys = [0, 1]; }
    var x0 = Math.min.apply(null, xs), x1 = Math.max.apply(null, xs);
    if (x1 === x0) { x1 = x0 + 1; }
    var y0, y1, ty;
    if (opts.logY) {
      var pos = ys.filter(function (v) { return v > 0; });
      var lo = pos.length ? Math.min.apply(null, pos) : 0.001;
      var hi = pos.length ? Math.max.apply(null, pos) : 1;
      y0 = Math.floor(Math.log10(lo)); y1 = Math.ceil(Math.log10(hi));
      if (y1 === y0) { y1 = y0 + 1; }
      ty = function (v) { return Math.log10(Math.max(v, Math.pow(10, y0))); };
    } else {
      y0 = 0; y1 = Math.max.apply(null, ys) * 1.08 || 1;
      ty = function (v) { return v; };
    }
    function px(x) { return L + (x - x0) / (x1 - x0) * (W - L - R); }
    function py(v) { return H - B - (ty(v) - y0) / (y1 - y0) * (H - T - B); }
    var yTicks = [];
    if (opts.logY) {
      for (var e = y0; e <= y1; e++) { yTicks.push(Math.pow(10, e)); }
    } else {
      yTicks = niceTicks(0, y1, 6);
    }
    yTicks.forEach(function (v) {
      var y = py(v);
      el("line", {x1: L, x2: W - R, y1: y, y2: y, "class": "grid"}, svg);
      el("text", {x: L - 8, y: y + 4, "text-anchor": "end", "class": "tick"}, svg, fmt(v));
    });
    var xTicks = opts.xTicks || niceTicks(x0, x1, 10).map(function (v) { return [v, fmt(v)]; });
    xTicks.forEach(function (t) {
      var x = px(t[0]);
      el("line", {x1: x, x2: x, y1: T, y2: H - B, "class": "grid"}, svg);
      el("text", {x: x, y: H - B + 16, "text-anchor": "middle", "class": "tick"}, svg, t[1]);
    });
    el("line", {x1: L, x2: W - R, y1: H - B, y2: H - B, "class": "axis"}, svg);
    el("line", {x1: L, x2: L, y1: T, y2: H - B, "class": "axis"}, svg);
    el("text", {x: (L + W - R) / 2, y: H - 8, "text-anchor": "middle", "class": "label"},
       svg, opts.xLabel);
    el("text", {x: 14, y: (T + H - B) / 2, "text-anchor": "middle", "class": "label",
                transform: "rotate(-90 14 " + (T + H - B) / 2 + ")"}, svg, opts.yLabel);
    var drawn = 0;
    opts.series.forEach(function (s, i) {
      var color = s.color || COLORS[i % COLORS.length];
      if (s.points.length) {
        var d = s.points.map(function (p, j) {
          return (j ? "L" : "M") + px(p[0]).toFixed(1) + " " + py(p[1]).toFixed(1);
        }).join(" ");
        var path = el("path", {d: d, stroke: color, "class": "series",
                               "data-series": s.name}, svg);
        el("title", {}, path, s.name);
        drawn++;
      }
      var ly = T + 6 + i * 18;
      el("rect", {x: W - R + 16, y: ly - 9, width: 12, height: 12, fill: color}, svg);
      el("text", {x: W - R + 34, y: ly + 1, "class": "legend"}, svg, s.name);
    });
    svg.setAttribute("data-series-drawn", drawn);
    container.appendChild(svg);
    return svg;
  }

  var charts = 0;
  // Each second is plotted at its middle, its rate over its real length (the last one is
  // partial); a last sliver too short to mean anything is not charted.
  var tl = (data.timeline || []).filter(function (t) { return t.charted; });
  // Throughput leaves out the drain after --duration (messages finishing, none starting).
  var run = tl.filter(function (t) { return !t.drain; });
  function mid(t) { return t.second + t.length_s / 2; }
  var msgs = document.getElementById("chart-throughput");
  lineChart(msgs, {
    title: "Messages per second", xLabel: "seconds since start", yLabel: "messages / s",
    series: [
      {name: "delivered", color: "#27ae60",
       points: run.map(function (t) { return [mid(t), t.delivered / t.length_s]; })},
      {name: "failed", color: "#c0392b",
       points: run.map(function (t) { return [mid(t), t.failed / t.length_s]; })}
    ]
  });
  charts++;
  lineChart(document.getElementById("chart-bytes"), {
    title: "Throughput (MB/s, 10^6 bytes)", xLabel: "seconds since start", yLabel: "MB / s",
    series: [{name: "MB/s", color: "#2e86de",
              points: run.map(function (t) { return [mid(t), t.bytes / 1e6 / t.length_s]; })}]
  });
  charts++;
  // Latency over time: a stall shows where it happened. Seconds without a message are gaps.
  var overTime = [
    ["message", "max", "#f5b7b1"], ["message", "p99", "#c0392b"], ["message", "p50", "#e67e22"],
    ["eod", "p99", "#8e44ad"], ["eod", "p50", "#2e86de"]
  ].map(function (spec) {
    var pts = [];
    tl.forEach(function (t) {
      var lat = t.latency_ms && t.latency_ms[spec[0]];
      if (lat) { pts.push([mid(t), lat[spec[1]]]); }
    });
    var label = spec[0] === "eod" ? "end of data" : "whole message";
    return {name: label + " " + spec[1], color: spec[2], points: pts};
  });
  lineChart(document.getElementById("chart-latency-time"), {
    title: "Latency per second (ms): p50, p99 and max", xLabel: "seconds since start",
    yLabel: "milliseconds", series: overTime
  });
  charts++;
  // Percentiles on a "number of nines" axis: x = -log10(1 - p/100); max goes at the far end.
  var MAXPOS = 6;
  function nines(p) { return p >= 100 ? MAXPOS : -Math.log10(1 - p / 100); }
  // Phases with the same curve (one shared measurement) come as one group, drawn once.
  var series = (data.curve_groups || []).map(function (group) {
    return {name: group.phases.join(" = "),
            points: group.points.map(function (pt) { return [nines(pt[0]), pt[1]]; })};
  });
  lineChart(document.getElementById("chart-latency"), {
    title: "Latency by percentile, per phase (ms, log scale)", xLabel: "percentile",
    yLabel: "milliseconds", logY: true, series: series,
    xTicks: [[0, "0%"], [1, "90%"], [2, "99%"], [3, "99.9%"], [4, "99.99%"],
             [5, "99.999%"], [MAXPOS, "max"]]
  });
  charts++;
  document.body.setAttribute("data-charts-rendered", String(charts));
})();
"""


def _e(value: Any) -> str:
    return html.escape(str(value))


def _card(label: str, value: str, cls: str = "") -> str:
    return f'<div class="card {cls}"><b>{_e(value)}</b><span>{_e(label)}</span></div>'


def _count_table(what: str, rows: Iterable[tuple[Any, int]]) -> str:
    body = "".join(f"<tr><td>{_e(name)}</td><td>{n:,}</td></tr>" for name, n in rows)
    return f"<table><tr><th>{_e(what)}</th><th>count</th></tr>{body}</table><p></p>"


def curve_groups(curves: dict[str, list[list[float]]]) -> list[dict[str, Any]]:
    """The percentile curves, phases with identical curves in one group (in report order)."""
    groups: list[dict[str, Any]] = []
    for phase, points in curves.items():
        for group in groups:
            if group["points"] == points:
                group["phases"].append(phase)
                break
        else:
            groups.append({"phases": [phase], "points": points})
    return groups


def _drain_note(timeline: list[dict[str, Any]]) -> str:
    drain = [row for row in timeline if row.get("drain")]
    if not drain:
        return ""
    finished = sum(row["delivered"] + row["failed"] for row in drain)
    return (
        f'<p class="note">Not drawn: {finished:,} messages that ended in the '
        f"{len(drain)} second(s) after --duration, when no message started any more (their "
        "latency is in the chart below).</p>"
    )


def _coincide_note(groups: list[dict[str, Any]]) -> str:
    shared = [" = ".join(g["phases"]) for g in groups if len(g["phases"]) > 1]
    if not shared:
        return ""
    names = "; ".join(shared)
    return (
        f'<p class="note">Drawn once: {_e(names)}. These phases share one measurement (with '
        "pipelining MAIL, RCPT and DATA travel in one write and are answered together), so "
        "their curves coincide.</p>"
    )


def _connections_html(report: dict[str, Any]) -> str:
    """Reconnects, back-off and TLS handshakes, where there were any."""
    rows: list[tuple[str, str]] = []
    totals = report["totals"]
    for reason, n in (totals.get("reconnects") or {}).items():
        why = "a 421" if reason == "421" else "the server closed the connection"
        rows.append((f"reconnects after {why} (the message went again)", f"{n:,}"))
    backoff = report.get("backoff") or {}
    if backoff.get("waits"):
        rows.append(
            (
                f"back-offs after failed connections ({backoff['min_s']:g}s to "
                f"{backoff['max_s']:g}s)",
                f"{backoff['waits']:,} ({backoff['seconds']:.1f}s)",
            )
        )
        if backoff.get("messages_not_started"):
            rows.append(("messages due while backing off", f"{backoff['messages_not_started']:,}"))
    tls = report.get("tls") or {}
    if tls.get("full_handshakes") or tls.get("resumed_handshakes"):
        rows.append(("TLS full handshakes", f"{tls['full_handshakes']:,}"))
        rows.append(("TLS resumed handshakes", f"{tls['resumed_handshakes']:,}"))
        for name, n in tls.get("versions_and_ciphers", {}).items():
            rows.append((f"TLS {name}", f"{n:,}"))
    if not rows:
        return ""
    body = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in rows)
    return f"<h2>Connections</h2><table><tr><th>what</th><th>count</th></tr>{body}</table>"


def _merged_from_note(report: dict[str, Any]) -> str:
    """For ``mailstorm report merge``: which runs the report adds up, and its notes on time."""
    runs = report.get("merged_from")
    if not runs:
        return ""
    names = ", ".join(
        f"{run['file']}" + (f" ({run['host']})" if run.get("host") else "") for run in runs
    )
    note = (
        f'<p class="note">Merged from {len(runs)} run(s): {_e(names)}. Counts are summed and '
        "percentiles read from the added histograms (mailstorm report merge).</p>"
    )
    for key in ("span_note", "timeline_note"):
        text = report["totals"].get(key) or report.get(key)
        if text:
            note += f'<p class="note">Note: {_e(text)}.</p>'
    return note


def render_html(report: dict[str, Any]) -> str:
    """The whole page as a string."""
    totals = report["totals"]
    config = report["config"]
    mode = config["mode"] + (f" at {config['rate']:g} msg/s" if config.get("rate") else "")
    cards = [
        _card("delivered", f"{totals['delivered']:,}", "good"),
        _card("attempted", f"{totals['attempted']:,}"),
        _card("failed", f"{totals['failed']:,}", "bad" if totals["failed"] else ""),
        _card("errors", f"{totals['errors']:,}", "bad" if totals["errors"] else ""),
        _card("messages / s", f"{totals['msg_rate']:,.1f}"),
        _card("MB / s", f"{totals['mb_rate']:,.2f}"),
        _card("seconds", f"{totals['elapsed_s']:.2f}"),
        _card("connections", f"{totals['connections']:,}"),
    ]
    phase_rows = "".join(
        f"<tr><td>{_e(phase)}</td><td>{s['count']:,}</td>"
        + "".join(
            f"<td>{s[k]:.3f}</td>"
            for k in ("min_ms", "mean_ms", "p50_ms", "p90_ms", "p99_ms", "p99_9_ms", "max_ms")
        )
        + "</tr>"
        for phase, s in report["phases"].items()
    )
    errors = report["errors"]
    if errors["by_kind"]:
        error_html = (
            _count_table("kind", errors["by_kind"].items())
            + _count_table("reply code", errors["by_code"].items())
            + _count_table("example", ((s["error"], s["count"]) for s in errors["samples"]))
        )
    else:
        error_html = '<p class="muted">No errors.</p>'
    fail_if = report.get("fail_if")
    fail_html = ""
    if fail_if:
        verdict = "FAILED" if fail_if["failed"] else "passed"
        fail_html = (
            f"<h2>--fail-if: {_e(verdict)}</h2><pre>{_e(fail_if['expression'])}\n\n"
            + _e("\n".join(fail_if["explanation"]))
            + "</pre>"
        )
    shown_config = {k: v for k, v in config.items() if v not in (None, [], "")}
    groups = curve_groups(report["percentile_curves"])
    notes = ""
    if report.get("interrupted"):
        notes += (
            '<div class="banner"><b>Interrupted.</b> The run was stopped (Ctrl-C): these '
            "results cover only the part that ran.</div>"
        )
    if totals.get("ramp_up_note"):
        notes += f'<p class="note">Note: {_e(totals["ramp_up_note"])}.</p>'
    notes += _merged_from_note(report)
    # Inside <script>, "</" could end the element early: escape it (JSON allows "\/").
    page_data = {k: report[k] for k in ("totals", "timeline", "phases")}
    page_data["curve_groups"] = groups
    data = json.dumps(page_data).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>mailstorm load report: {_e(config["target"])}</title>
<style>{_CSS}</style></head>
<body><main>
<h1>mailstorm load: {_e(config["target"])}</h1>
<div class="sub">{_e(mode)}, {_e(config["sessions"])} sessions, started {_e(report["started_at"])}
</div>
{notes}
<div class="cards">{"".join(cards)}</div>
<h2>Throughput over time</h2>
<div class="chart" id="chart-throughput"></div>
<div class="chart" id="chart-bytes"></div>{_drain_note(report["timeline"])}
<h2>Latency over time</h2>
<div class="chart" id="chart-latency-time"></div>
<h2>Latency by percentile</h2>
<div class="chart" id="chart-latency"></div>{_coincide_note(groups)}
<h2>Latency per phase (ms)</h2>
<table><tr><th>phase</th><th>count</th><th>min</th><th>mean</th><th>p50</th><th>p90</th>
<th>p99</th><th>p99.9</th><th>max</th></tr>{phase_rows}</table>
{_connections_html(report)}
<h2>Errors</h2>{error_html}{fail_html}
<h2>Configuration</h2><pre>{_e(json.dumps(shown_config, indent=2))}</pre>
</main>
<script type="application/json" id="report-data">{data}</script>
<script>{_JS}</script>
</body></html>
"""


def write_html(report: dict[str, Any], path: str) -> None:
    Path(path).write_text(render_html(report), encoding="utf-8")
