// Small SVG/HTML charts for semifer serve: line charts, stacked shares, confusion tables and
// probability bars. Written here rather than loaded from a CDN: the page must work offline.
"use strict";

const Charts = (() => {
  // matplotlib's tab10: each class keeps the colour it has in semifer's PNG plots
  const CLASS_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
  // runs get another palette (Dark2) so a run is never mistaken for a class
  const RUN_COLORS = ["#1b9e77", "#d95f02", "#7570b3", "#e7298a", "#66a61e", "#e6ab02", "#a6761d", "#666666"];
  const NS = "http://www.w3.org/2000/svg";

  function el(tag, attrs = {}, parent = null, text = null) {
    const node = document.createElementNS(NS, tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== null) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  function html(tag, cls, parent, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }

  // "nice" round tick values covering [lo, hi]
  function ticks(lo, hi, n = 5) {
    if (!(hi > lo)) { hi = lo + 1; }
    const raw = (hi - lo) / n, mag = Math.pow(10, Math.floor(Math.log10(raw)));
    const step = [1, 2, 2.5, 5, 10].map(m => m * mag).find(s => s >= raw) || raw;
    const out = [];
    for (let v = Math.ceil(lo / step) * step; v <= hi + step * 1e-9; v += step) out.push(+v.toPrecision(12));
    return out;
  }

  function fmt(v) {
    const a = Math.abs(v);
    return a >= 10000 ? (v / 1000).toFixed(0) + "k" : a >= 100 ? v.toFixed(0) : +v.toPrecision(3) + "";
  }

  // opts: {title, xlabel, ymin, ymax, width, height, series: [{label, color, x, y, dash, width}], legend}
  function line(container, opts) {
    container.innerHTML = "";
    const W = opts.width || 520, H = opts.height || 240, m = {l: 42, r: 10, t: opts.title ? 22 : 8, b: 30};
    const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, role: "img"}, container);
    if (opts.title) el("text", {x: 6, y: 15, class: "title"}, svg, opts.title);
    const pts = [];
    for (const s of opts.series) s.x.forEach((x, i) => { if (s.y[i] !== null && s.y[i] !== undefined) pts.push([x, s.y[i]]); });
    if (!pts.length) {
      el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#8a93a0", class: "empty"}, svg, opts.empty || "nothing logged yet");
      return svg;
    }
    let [x0, x1] = [Math.min(...pts.map(p => p[0])), Math.max(...pts.map(p => p[0]))];
    let y0 = opts.ymin ?? Math.min(...pts.map(p => p[1])), y1 = opts.ymax ?? Math.max(...pts.map(p => p[1]));
    if (x1 === x0) { x0 -= 1; x1 += 1; }
    if (y1 === y0) { y0 -= 0.5; y1 += 0.5; }
    const sx = x => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r);
    const sy = y => H - m.b - (y - y0) / (y1 - y0) * (H - m.t - m.b);
    for (const t of ticks(y0, y1, 4)) {
      el("line", {x1: m.l, x2: W - m.r, y1: sy(t), y2: sy(t), stroke: "#e6e9ee"}, svg);
      el("text", {x: m.l - 4, y: sy(t) + 4, "text-anchor": "end", "font-size": 10, fill: "#5b6574"}, svg, fmt(t));
    }
    for (const t of ticks(x0, x1, 5)) {
      el("line", {x1: sx(t), x2: sx(t), y1: H - m.b, y2: H - m.b + 4, stroke: "#9aa3ae"}, svg);
      el("text", {x: sx(t), y: H - m.b + 15, "text-anchor": "middle", "font-size": 10, fill: "#5b6574"}, svg, fmt(t));
    }
    el("line", {x1: m.l, x2: W - m.r, y1: H - m.b, y2: H - m.b, stroke: "#9aa3ae"}, svg);
    if (opts.xlabel) el("text", {x: W - m.r, y: H - 3, "text-anchor": "end", "font-size": 10, fill: "#5b6574"}, svg, opts.xlabel);
    for (const s of opts.series) {
      let d = "", pen = false, n = 0;
      s.x.forEach((x, i) => {
        const y = s.y[i];
        if (y === null || y === undefined) { pen = false; return; }   // a gap: no face, nothing logged
        d += `${pen ? "L" : "M"}${sx(x).toFixed(1)},${sy(y).toFixed(1)}`;
        pen = true; n++;
      });
      if (!n) continue;
      const attrs = {d, fill: "none", stroke: s.color, "stroke-width": s.width || 1.8, class: "series"};
      if (s.dash) attrs["stroke-dasharray"] = "5 3";
      el("path", attrs, svg).appendChild(el("title", {}, null, s.label));
      if (n <= 40) s.x.forEach((x, i) => {   // sparse series (a few evals) need markers to be readable
        if (s.y[i] !== null && s.y[i] !== undefined) el("circle", {cx: sx(x), cy: sy(s.y[i]), r: 2.4, fill: s.color}, svg);
      });
    }
    if (opts.legend !== false) legend(container, opts.series.filter(s => s.label));
    return svg;
  }

  function legend(container, items) {
    const box = html("div", "legend", container);
    for (const s of items) {
      const item = html("span", "", box);
      const sw = html("i", "", item);
      sw.style.background = s.color;
      if (s.dash) sw.style.background = `repeating-linear-gradient(90deg, ${s.color} 0 5px, transparent 5px 8px)`;
      item.appendChild(document.createTextNode(s.label));
    }
  }

  // shares of 8 classes over steps as stacked areas (rows normalised; an all-zero row stays empty)
  function stack(container, opts) {
    container.innerHTML = "";
    const W = opts.width || 520, H = opts.height || 200, m = {l: 42, r: 10, t: 22, b: 30};
    const svg = el("svg", {viewBox: `0 0 ${W} ${H}`, role: "img"}, container);
    el("text", {x: 6, y: 15, class: "title"}, svg, opts.title || "");
    const xs = opts.x, rows = opts.rows.map(r => {
      const v = r.map(x => x || 0), tot = v.reduce((a, b) => a + b, 0);
      return tot > 0 ? v.map(x => x / tot) : v.map(() => 0);
    });
    if (!xs.length) {
      el("text", {x: W / 2, y: H / 2, "text-anchor": "middle", fill: "#8a93a0", class: "empty"}, svg, "nothing logged yet");
      return svg;
    }
    const x0 = xs[0], x1 = xs[xs.length - 1] > x0 ? xs[xs.length - 1] : x0 + 1;
    const sx = x => m.l + (x - x0) / (x1 - x0) * (W - m.l - m.r), sy = y => H - m.b - y * (H - m.t - m.b);
    const base = xs.map(() => 0);
    opts.labels.forEach((name, k) => {
      const top = base.map((b, i) => b + rows[i][k]);
      const up = xs.map((x, i) => `${sx(x).toFixed(1)},${sy(top[i]).toFixed(1)}`);
      const down = xs.map((x, i) => `${sx(x).toFixed(1)},${sy(base[i]).toFixed(1)}`).reverse();
      el("polygon", {points: up.concat(down).join(" "), fill: CLASS_COLORS[k], opacity: 0.85, class: "area"}, svg)
        .appendChild(el("title", {}, null, name));
      top.forEach((t, i) => { base[i] = t; });
    });
    for (const t of [0, 0.5, 1]) el("text", {x: m.l - 4, y: sy(t) + 4, "text-anchor": "end", "font-size": 10, fill: "#5b6574"}, svg, t);
    for (const t of ticks(x0, x1, 5)) el("text", {x: sx(t), y: H - m.b + 15, "text-anchor": "middle", "font-size": 10, fill: "#5b6574"}, svg, fmt(t));
    el("text", {x: W - m.r, y: H - 3, "text-anchor": "end", "font-size": 10, fill: "#5b6574"}, svg, "step");
    legend(container, opts.labels.map((label, k) => ({label, color: CLASS_COLORS[k]})));
    return svg;
  }

  // rows = true class, columns = predicted; cells shaded by the row-normalised fraction, counts written
  function confusion(container, matrix, labels, title) {
    const wrap = html("div", "chart", container);
    html("div", "title", wrap, title);
    const table = html("table", "confusion", wrap);
    const head = html("tr", "", table);
    html("th", "", head, "true \\ predicted");
    labels.forEach(l => html("th", "", head, l.slice(0, 4)));
    matrix.forEach((row, i) => {
      const tr = html("tr", "", table), tot = row.reduce((a, b) => a + b, 0);
      html("th", "", tr, `${labels[i]} (${tot})`);
      row.forEach(v => {
        const f = tot ? v / tot : 0, td = html("td", "", tr, String(v));
        td.style.background = `rgba(31, 111, 235, ${f.toFixed(3)})`;
        td.style.color = f > 0.55 ? "#fff" : "#1d2430";
      });
    });
    return wrap;
  }

  // one row per class: name, bar, probability; the most likely class in bold
  function bars(container, probs, labels) {
    const top = probs.indexOf(Math.max(...probs));
    const box = html("div", "bars", container);
    labels.forEach((name, k) => {
      const row = html("div", "bar-row" + (k === top ? " top" : ""), box);
      html("span", "name", row, name);
      const bar = html("div", "bar", html("div", "bar-track", row));
      bar.style.width = `${(100 * probs[k]).toFixed(1)}%`;
      bar.style.background = CLASS_COLORS[k];
      html("span", "value", row, probs[k].toFixed(3));
    });
    return box;
  }

  return {line, stack, confusion, bars, legend, html, CLASS_COLORS, RUN_COLORS};
})();
