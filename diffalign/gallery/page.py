"""The gallery's static page: one ``index.html`` that opens from disk (no server, no network assets).

The data (prompts, files, scores, statistics) is embedded as JSON; a small script builds one card per
prompt with the models side by side, sorts cards by a score difference between two models, and filters
them by prompt text. The controls' state lives in the URL's ``#`` part, so a view can be shared.
Media are linked by relative path: images (PNG, animated WebP/GIF) as ``<img>``, ``.mp4``/``.webm`` as
``<video>`` that plays inline.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".gif")
VIDEO_SUFFIXES = (".mp4", ".webm")


def media_kind(file: str) -> str:
    """How the page shows a file: ``video`` (a <video> element) or ``image`` (an <img>, animated or not)."""
    return "video" if file.lower().endswith(VIDEO_SUFFIXES) else "image"


def page_data(manifest, rows: Sequence[dict], summary: dict, models: Sequence[str],
              scorers: Sequence[str], plots: Sequence[str]) -> dict:
    cards = [{"index": i, "text": text, "cells": {}} for i, text in enumerate(manifest.prompts)]
    for r in rows:
        cards[r["prompt_index"]]["cells"].setdefault(r["model"], []).append(
            {"k": r["image_index"], "seed": r["seed"], "file": r["file"], "kind": media_kind(r["file"]),
             "scores": r["scores"]})
    return {
        "settings": manifest.settings,
        "models": [{"name": m, **{k: manifest.models[m].get(k) for k in ("source", "lora", "base", "status", "error")}}
                   for m in models],
        "scorers": [{"name": s, "higher_is_better": manifest.scorers[s]["higher_is_better"]} for s in scorers],
        "prompts": cards,
        "stats": summary["stats"],
        "plots": list(plots),
    }


def write_page(out: Path, manifest, rows, summary, models, scorers, plots) -> Path:
    data = page_data(manifest, rows, summary, models, scorers, plots)
    # "</" inside a <script> element would end it early
    blob = json.dumps(data, allow_nan=False, default=str).replace("</", "<\\/")
    title = html.escape(f"diffalign gallery · {', '.join(models)}")
    page = TEMPLATE.replace("{{TITLE}}", title).replace("{{DATA}}", blob)
    tmp = out / ".index.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out / "index.html")
    return out / "index.html"


TEMPLATE = r"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{TITLE}}</title>
<link rel="icon" href="data:,">
<style>
  :root { --thumb: 192px; --fg: #1d2330; --muted: #667085; --line: #e4e7ec; --bg: #f6f7f9; --card: #fff;
          --accent: #3b5bdb; --good: #1f7a3a; --bad: #b42318; }
  * { box-sizing: border-box; }
  body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg);
         background: var(--bg); }
  header { padding: 18px 28px 10px; background: var(--card); border-bottom: 1px solid var(--line); }
  h1 { font-size: 20px; margin: 0 0 4px; }
  h2 { font-size: 15px; margin: 22px 0 8px; }
  .muted { color: var(--muted); }
  main { padding: 0 28px 40px; }
  .failed { background: #fef3f2; border: 1px solid #fecdca; color: var(--bad); padding: 10px 14px;
            border-radius: 8px; margin-top: 14px; }
  .failed b { font-family: ui-monospace, monospace; }
  table.stats { border-collapse: collapse; background: var(--card); border: 1px solid var(--line);
                border-radius: 8px; overflow: hidden; }
  table.stats th, table.stats td { padding: 6px 12px; border-bottom: 1px solid var(--line); text-align: right;
                                   font-variant-numeric: tabular-nums; }
  table.stats th:first-child, table.stats td:first-child { text-align: left; }
  table.stats th { background: #f2f4f7; font-weight: 600; font-size: 12px; color: #344054; }
  .ci { color: var(--muted); font-size: 12px; }
  .summary { display: flex; flex-wrap: wrap; gap: 24px; align-items: flex-start; }
  .plots { display: flex; flex-wrap: wrap; gap: 12px; }
  .plots img { max-height: 300px; background: #fff; border: 1px solid var(--line); border-radius: 8px; }
  .controls { position: sticky; top: 0; z-index: 5; display: flex; flex-wrap: wrap; gap: 10px 18px;
              align-items: center; padding: 10px 0; background: var(--bg); border-bottom: 1px solid var(--line);
              margin-top: 18px; }
  .controls label { display: flex; gap: 6px; align-items: center; color: #344054; }
  .controls input[type=search] { width: 240px; }
  select, input { font: inherit; padding: 3px 6px; border: 1px solid #d0d5dd; border-radius: 6px; background: #fff; }
  #cards { display: flex; flex-direction: column; gap: 14px; margin-top: 14px; }
  .card { background: var(--card); border: 1px solid var(--line); border-radius: 10px; padding: 12px 14px; }
  .card-head { display: flex; justify-content: space-between; gap: 12px; align-items: baseline; }
  .prompt { font-weight: 600; font-size: 15px; }
  .pidx { color: var(--muted); font-weight: 400; margin-right: 6px; }
  .diff { font-variant-numeric: tabular-nums; white-space: nowrap; padding: 2px 8px; border-radius: 999px;
          background: #f2f4f7; }
  .diff.pos { color: var(--good); background: #ecfdf3; }
  .diff.neg { color: var(--bad); background: #fef3f2; }
  .means { display: flex; flex-wrap: wrap; gap: 4px 14px; margin-top: 2px; font-size: 13px;
           font-variant-numeric: tabular-nums; }
  .groups { display: flex; flex-wrap: wrap; gap: 12px 22px; margin-top: 10px; }
  .group-head { font-size: 12px; color: var(--muted); margin-bottom: 4px; }
  .row { display: flex; gap: 8px; }
  .model { font-size: 12px; font-weight: 600; margin-bottom: 2px; }
  figure { margin: 0; }
  figure img, figure video { width: var(--thumb); height: auto; display: block; border-radius: 6px;
                             background: #eef0f3; image-rendering: auto; }
  figure img.small { image-rendering: pixelated; }
  figcaption { font-size: 12px; font-variant-numeric: tabular-nums; margin-top: 3px; color: #344054;
               width: var(--thumb); overflow-wrap: anywhere; }
  figcaption .best { font-weight: 700; color: var(--good); }
  .cell-failed { width: var(--thumb); min-height: 60px; padding: 8px; font-size: 12px; color: var(--bad);
                 background: #fef3f2; border-radius: 6px; }
  .hidden { display: none !important; }
</style>
</head>
<body>
<header>
  <h1>diffalign gallery</h1>
  <div id="settings" class="muted"></div>
  <div id="failures"></div>
</header>
<main>
  <section class="summary">
    <div><h2>Mean score <span class="muted">(95% CI over prompts)</span></h2><table class="stats" id="means"></table></div>
    <div id="win-block"><h2>Win rate per prompt <span class="muted">(A vs B, 95% Wilson interval)</span></h2>
      <table class="stats" id="wins"></table></div>
  </section>
  <h2>Plots</h2>
  <div class="plots" id="plots"></div>
  <div class="controls">
    <label>Filter <input type="search" id="filter" placeholder="prompt text…"></label>
    <label>Scorer <select id="scorer"></select></label>
    <label>Sort <select id="sort">
      <option value="index">prompt order</option>
      <option value="diff-desc">A − B, largest first</option>
      <option value="diff-asc">A − B, smallest first</option>
      <option value="absdiff">|A − B|, largest first</option>
      <option value="a-desc">score of A, highest first</option>
    </select></label>
    <label>A <select id="model-a"></select></label>
    <label>B <select id="model-b"></select></label>
    <label>Size <input type="range" id="size" min="96" max="512" step="32" value="192"></label>
    <span id="count" class="muted"></span>
  </div>
  <div id="cards"></div>
</main>
<script id="gallery-data" type="application/json">{{DATA}}</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("gallery-data").textContent);
const $ = (id) => document.getElementById(id);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v; else if (k === "text") node.textContent = v; else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
};
const fmt = (v) => v === null || v === undefined || Number.isNaN(v) ? "—"
  : Math.abs(v) >= 100 ? v.toFixed(1) : Math.abs(v) >= 1 ? v.toFixed(3) : v.toFixed(4);
const okModels = DATA.models.filter((m) => m.status !== "failed" || DATA.prompts.some((p) => p.cells[m.name]));
const higher = Object.fromEntries(DATA.scorers.map((s) => [s.name, s.higher_is_better]));

function header() {
  const s = DATA.settings;
  $("settings").textContent = `${DATA.prompts.length} prompts × ${s.images_per_prompt} images · seed ${s.seed} · ` +
    `${s.steps} steps · guidance ${s.guidance} · eta ${s.eta}` + (s.height ? ` · ${s.width}×${s.height}` : "") +
    ` · models: ${DATA.models.map((m) => m.name).join(", ")}`;
  for (const m of DATA.models.filter((m) => m.status === "failed")) {
    $("failures").append(el("div", {class: "failed", "data-model": m.name},
      "Model ", el("b", {text: m.name}), ` (${m.source}) failed: ${m.error}`));
  }
}

function statsTables() {
  const means = $("means");
  means.append(el("tr", {}, el("th", {text: "model"}), ...DATA.scorers.map((s) =>
    el("th", {text: s.name + (s.higher_is_better ? " ↑" : " ↓")}))));
  for (const m of DATA.models) {
    const row = el("tr", {}, el("td", {text: m.name + (m.status === "failed" ? " (failed)" : "")}));
    for (const s of DATA.scorers) {
      const v = (DATA.stats.means[m.name] || {})[s.name];
      const ci = v && v.ci_low !== null ? el("span", {class: "ci", text: `[${fmt(v.ci_low)}, ${fmt(v.ci_high)}]`}) : "";
      row.append(v ? el("td", {}, fmt(v.mean) + " ", ci) : el("td", {text: "—"}));
    }
    means.append(row);
  }
  const wins = DATA.stats.win_rates;
  if (!wins.length) { $("win-block").classList.add("hidden"); return; }
  $("wins").append(el("tr", {}, ...["A vs B", "scorer", "win rate of A", "W / T / L", "mean A − B"].map((t) => el("th", {text: t}))));
  for (const w of wins) {
    $("wins").append(el("tr", {},
      el("td", {text: `${w.a} vs ${w.b}`}), el("td", {text: w.scorer}),
      el("td", {}, w.win_rate.toFixed(3) + " ", el("span", {class: "ci", text: `[${w.ci_low.toFixed(3)}, ${w.ci_high.toFixed(3)}]`})),
      el("td", {text: `${w.wins} / ${w.ties} / ${w.losses}`}),
      el("td", {}, (w.mean_diff >= 0 ? "+" : "") + fmt(w.mean_diff) + " ",
         el("span", {class: "ci", text: `[${fmt(w.diff_ci_low)}, ${fmt(w.diff_ci_high)}]`}))));
  }
}

function plots() {
  for (const p of DATA.plots) $("plots").append(el("a", {href: p, target: "_blank"}, el("img", {src: p, alt: p})));
}

function promptMean(card, model, scorer) {
  const cells = card.cells[model] || [];
  const values = cells.map((c) => c.scores[scorer]).filter((v) => typeof v === "number");
  return values.length ? values.reduce((a, b) => a + b, 0) / values.length : null;
}

function media(cell) {
  if (cell.kind === "video") {
    return el("video", {src: cell.file, autoplay: "", loop: "", muted: "", playsinline: "", controls: ""});
  }
  const img = el("img", {src: cell.file, alt: `image ${cell.k}, seed ${cell.seed}`, loading: "lazy"});
  img.addEventListener("load", () => { if (img.naturalWidth < 128) img.classList.add("small"); });
  return el("a", {href: cell.file, target: "_blank"}, img);
}

function buildCards() {
  const all = DATA.models;
  for (const card of DATA.prompts) {
    // one group per image index: the models' images from the same noise stand side by side
    const groups = el("div", {class: "groups"});
    for (let k = 0; k < Math.max(DATA.settings.images_per_prompt, 1); k++) {
      const seed = (Object.values(card.cells).flat().find((c) => c.k === k) || {seed: "—"}).seed;
      const row = el("div", {class: "row"});
      for (const m of all) {
        const cell = (card.cells[m.name] || []).find((c) => c.k === k);
        const label = el("div", {class: "model", text: m.name});
        if (!cell) {
          row.append(el("figure", {}, label, el("div", {class: "cell-failed", title: m.error || "",
            text: m.status === "failed" ? "failed (the error is at the top of the page)" : "not generated"})));
          continue;
        }
        row.append(el("figure", {}, label, media(cell), el("figcaption", {"data-k": String(k), "data-model": m.name})));
      }
      groups.append(el("div", {class: "group"}, el("div", {class: "group-head", text: `image ${k} · seed ${seed}`}), row));
    }
    const node = el("section", {class: "card", "data-index": String(card.index)},
      el("div", {class: "card-head"},
        el("div", {class: "prompt"}, el("span", {class: "pidx", text: `#${card.index}`}), card.text),
        el("span", {class: "diff"})),
      el("div", {class: "means"}), groups);
    card.node = node;
    $("cards").append(node);
  }
  if (!okModels.length) $("cards").append(el("div", {class: "failed", text: "No model produced images."}));
}

function updateScores(scorer) {
  for (const card of DATA.prompts) {
    const means = card.node.querySelector(".means");
    means.replaceChildren(...(scorer ? DATA.models.map((m) => {
      const v = promptMean(card, m.name, scorer);
      return el("span", {}, el("b", {text: m.name}), ` ${v === null ? "—" : fmt(v)}`);
    }) : []));
    if (scorer) means.prepend(el("span", {class: "muted", text: `mean ${scorer}:`}));
    for (const cap of card.node.querySelectorAll("figcaption")) {
      const k = Number(cap.dataset.k);
      const values = DATA.models.map((m) => ((card.cells[m.name] || []).find((c) => c.k === k) || {scores: {}}).scores[scorer]);
      const valid = values.filter((v) => typeof v === "number");
      const best = valid.length > 1 ? (higher[scorer] ? Math.max(...valid) : Math.min(...valid)) : null;
      const cell = (card.cells[cap.dataset.model] || []).find((c) => c.k === k);
      cap.replaceChildren();
      for (const s of DATA.scorers) {
        const v = cell.scores[s.name];
        const line = el("div", {class: s.name === scorer ? "" : "muted"}, `${s.name}: `, el("span", {text: fmt(v)}));
        if (s.name === scorer && best !== null && v === best) line.lastChild.className = "best";
        cap.append(line);
      }
    }
  }
}

function readHash() {
  const h = new URLSearchParams(location.hash.slice(1));
  for (const [key, id] of [["q", "filter"], ["scorer", "scorer"], ["sort", "sort"], ["a", "model-a"], ["b", "model-b"], ["size", "size"]]) {
    if (!h.has(key)) continue;
    const node = $(id);
    if (node.tagName === "SELECT" && ![...node.options].some((o) => o.value === h.get(key))) continue;
    node.value = h.get(key);
  }
}

function writeHash() {
  const h = new URLSearchParams({q: $("filter").value, scorer: $("scorer").value, sort: $("sort").value,
                                 a: $("model-a").value, b: $("model-b").value, size: $("size").value});
  history.replaceState(null, "", "#" + h.toString());
}

function apply() {
  const scorer = $("scorer").value, a = $("model-a").value, b = $("model-b").value, sort = $("sort").value;
  const query = $("filter").value.trim().toLowerCase();
  document.documentElement.style.setProperty("--thumb", $("size").value + "px");
  updateScores(scorer);
  const key = (card) => {
    const va = promptMean(card, a, scorer), vb = promptMean(card, b, scorer);
    card.diffValue = va === null || vb === null || a === b ? null : va - vb;
    if (sort === "index") return card.index;
    if (sort === "a-desc") return va === null ? Infinity : -va;
    if (card.diffValue === null) return Infinity;
    return sort === "diff-desc" ? -card.diffValue : sort === "diff-asc" ? card.diffValue : -Math.abs(card.diffValue);
  };
  const order = [...DATA.prompts].map((c) => [key(c), c]).sort((x, y) => x[0] - y[0] || x[1].index - y[1].index);
  let shown = 0;
  for (const [, card] of order) {
    const badge = card.node.querySelector(".diff");
    badge.textContent = card.diffValue === null ? "" : `${a} − ${b}: ${card.diffValue >= 0 ? "+" : ""}${fmt(card.diffValue)}`;
    const better = card.diffValue === null || card.diffValue === 0 ? 0 : (card.diffValue > 0) === higher[scorer] ? 1 : -1;
    badge.className = "diff" + (better > 0 ? " pos" : better < 0 ? " neg" : "");
    const visible = !query || card.text.toLowerCase().includes(query);
    card.node.classList.toggle("hidden", !visible);
    shown += visible;
    $("cards").append(card.node);
  }
  $("count").textContent = `showing ${shown} of ${DATA.prompts.length} prompts`;
  writeHash();
}

function controls() {
  for (const s of DATA.scorers) $("scorer").append(el("option", {value: s.name, text: s.name}));
  for (const id of ["model-a", "model-b"]) {
    for (const m of okModels) $(id).append(el("option", {value: m.name, text: m.name}));
  }
  // default: the last model (e.g. the fine-tune) against the first (the baseline)
  if (okModels.length) { $("model-a").value = okModels[okModels.length - 1].name; $("model-b").value = okModels[0].name; }
  if (okModels.length < 2) {  // nothing to compare: only prompt order and the score of A make sense
    for (const id of ["model-a", "model-b"]) $(id).parentElement.classList.add("hidden");
    for (const option of $("sort").options) option.hidden = !["index", "a-desc"].includes(option.value);
  }
  readHash();
  for (const id of ["scorer", "sort", "model-a", "model-b"]) $(id).addEventListener("change", apply);
  $("filter").addEventListener("input", apply);
  $("size").addEventListener("input", apply);
}

header();
statsTables();
plots();
buildCards();
controls();
apply();
</script>
</body>
</html>
"""
