// The Model view: what `attendo info` prints, and the data path of this model (tokenizer →
// embedding + positions → N × (attention, feed-forward) → norm → LM head → softmax) drawn as an
// SVG with the model's own numbers, both from GET /v1/inspect/model.

import { getJSON } from "./api.js";
import { $, h, reportError } from "./dom.js";
import { on, selectedModel } from "./state.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 560;
const LINE = 17;
const CHAR_WIDTH = 7.3; // of the 12px monospace lines
const GAP = 26; // room for the arrow between two boxes
const TITLES = { lm_head: "LM head", feed_forward: "feed-forward", cross_attention: "cross-attention", self_attention: "self-attention" };
const FILL = { stack: "#eef2ff", box: "#ffffff", sub: "#f8fafc" };

function svg(tag, attributes = {}, text = null) {
  const node = document.createElementNS(SVG, tag);
  for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
  if (text !== null) node.textContent = text;
  return node;
}

const title = (name) => TITLES[name] || name.replaceAll("_", " ");

function formatValue(value) {
  if (typeof value === "number") return value.toLocaleString();
  if (Array.isArray(value)) return value.join(" × ");
  return String(value);
}

// An entry's own lines ("key: value") and its nested parts (objects: drawn as boxes inside it).
function split(entry) {
  const lines = [];
  const parts = [];
  for (const [key, value] of Object.entries(entry)) {
    if (key === "stage" || key === "name" || key === "count" || key === "stack") continue;
    if (value === null || value === false || value === 0) continue; // a feature the model does not have
    const small = value && typeof value === "object" && !Array.isArray(value) && Object.keys(value).length <= 2;
    if (small) lines.push(`${title(key)}: ${Object.values(value).map(formatValue).join(", ")}`);
    else if (value && typeof value === "object" && !Array.isArray(value)) parts.push([key, value]);
    else if (Array.isArray(value) && value.length && typeof value[0] === "object") value.forEach((v, i) => parts.push([v.stage || v.name || `${key} ${i + 1}`, v]));
    else lines.push(`${title(key)}: ${formatValue(value)}`);
  }
  return { lines, parts };
}

// Draws `entry` as a box at (x, y) of the given width; returns its height.
// A line cut at spaces into pieces of at most `chars` characters (SVG text does not wrap).
function wrap(line, chars) {
  const pieces = [];
  let current = "";
  for (const word of line.split(" ")) {
    if (current && current.length + 1 + word.length > chars) {
      pieces.push(current);
      current = `  ${word}`;
    } else current = current ? `${current} ${word}` : word;
  }
  pieces.push(current);
  return pieces;
}

function box(group, entry, name, x, y, width, depth) {
  const { lines: own, parts } = split(entry);
  const lines = own.flatMap((line) => wrap(line, Math.floor((width - 20) / CHAR_WIDTH)));
  const heading = entry.count ? `${entry.count} × ${entry.stack ? `${entry.stack} ` : ""}block` : title(name);
  const inner = svg("g");
  let height = 26 + lines.length * LINE;
  if (parts.length) {
    // Nested parts side by side (attention beside feed-forward), or one under another when narrow.
    const across = parts.length <= 3 && width / parts.length >= 150;
    const partWidth = across ? (width - 16 - (parts.length - 1) * 8) / parts.length : width - 16;
    let tallest = 0;
    let offset = 0;
    parts.forEach(([partName, part], i) => {
      const px = across ? x + 8 + i * (partWidth + 8) : x + 8;
      const py = y + height + (across ? 0 : offset);
      const used = box(inner, part, partName, px, py, partWidth, depth + 1);
      tallest = Math.max(tallest, used);
      offset += used + 8;
    });
    height += (across ? tallest + 8 : offset) + 4;
  }
  const fill = entry.count ? FILL.stack : depth ? FILL.sub : FILL.box;
  if (entry.count) group.append(svg("rect", { x: x + 6, y: y + 6, width, height, rx: 8, fill: "#dbe4ff", stroke: "#94a3b8" }));
  group.append(svg("rect", { x, y, width, height, rx: 8, fill, stroke: "#64748b", "stroke-width": depth ? 1 : 1.5 }));
  group.append(svg("text", { x: x + 10, y: y + 18, class: "path-title" }, heading));
  lines.forEach((line, i) => group.append(svg("text", { x: x + 10, y: y + 18 + (i + 1) * LINE, class: "path-line" }, line)));
  group.append(inner);
  return height;
}

function drawPath(path) {
  const root = svg("svg", { role: "img", "aria-label": "The model's data path", class: "path-svg" });
  const group = svg("g");
  root.append(svg("defs", {}), group);
  root.firstChild.append(
    (() => {
      const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 9, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
      marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#475569" }));
      return marker;
    })(),
  );
  let y = 4;
  path.forEach((entry, i) => {
    if (i) {
      group.append(svg("line", { x1: WIDTH / 2, y1: y - GAP + 4, x2: WIDTH / 2, y2: y - 2, stroke: "#475569", "stroke-width": 1.5, "marker-end": "url(#arrow)" }));
    }
    y += box(group, entry, entry.stage || entry.name || "stage", 4, y, WIDTH - 16, 0) + GAP;
  });
  root.setAttribute("viewBox", `0 0 ${WIDTH} ${y - GAP + 12}`);
  root.setAttribute("width", WIDTH);
  root.setAttribute("height", y - GAP + 12);
  return root;
}

function drawInfo(info) {
  $("model-info").replaceChildren(...Object.entries(info).map(([key, value]) => h("tr", {}, h("th", { scope: "row" }, key), h("td", {}, Array.isArray(value) ? value.join(", ") : String(value)))));
}

async function show(model) {
  if (!model) return;
  try {
    const about = model.info ? model : await getJSON(`v1/inspect/model?model=${encodeURIComponent(model.id)}`);
    drawInfo(about.info);
    $("model-path").replaceChildren(drawPath(about.path));
  } catch (error) {
    reportError(error);
  }
}

export function setup() {
  on("model", (model) => {
    if (!$("view-model").hidden) show(model);
  });
  on("view", (view) => {
    if (view === "model") show(selectedModel());
  });
}
