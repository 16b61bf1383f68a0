// The Embeddings view: words or sentences placed in 2-D or 3-D by POST /v1/inspect/embeddings
// (PCA of the model's vectors), drawn on a canvas with a small projection of our own (drag or the
// arrow keys rotate the 3-D view), with the cosine and angle between any two picked points: these
// come from the full vectors, not from the projection.

import { postJSON } from "./api.js";
import { cosineColor, css, legend } from "./colors.js";
import { $, clearError, h, reportError, sizeCanvas } from "./dom.js";
import { on, state } from "./state.js";

const MATRIX_LIMIT = 20; // the cosine table is shown up to this many inputs
const PAD = 48;

let result = null; // the route's answer and the inputs it was for
let picked = []; // indices of at most two points
let yaw = -0.6;
let pitch = 0.35;
let zoom = 1; // the mouse wheel or + and - scale the plot
let screen = []; // where each point was drawn: [{x, y, index}]

async function place() {
  if (!state.model) return;
  clearError();
  const inputs = $("embed-inputs").value.split("\n").map((s) => s.trim()).filter(Boolean);
  const dims = Number(document.querySelector('input[name="dims"]:checked').value);
  $("embed-run").disabled = true;
  try {
    const response = await postJSON("v1/inspect/embeddings", { model: state.model, inputs, dims });
    result = { ...response, inputs, dims };
    picked = inputs.length >= 2 ? [0, 1] : [];
    describe();
    draw();
    drawMatrix();
  } catch (error) {
    reportError(error);
  } finally {
    $("embed-run").disabled = false;
  }
}

function describe() {
  const variance = result.explained_variance.map((v, i) => `PC${i + 1} ${(v * 100).toFixed(0)}%`).join(", ");
  $("embed-source").textContent = `${result.model}: ${result.source}. The axes are the ${result.dims} principal components, which keep ${variance} of the variance.`;
  $("embed-help").textContent = result.dims === 3 ? "Drag (or the arrow keys) to rotate, scroll (or + and -) to zoom. Click two points to compare them (purple); smaller, paler points are farther away." : "Scroll (or + and -) to zoom. Click two points to compare them (purple).";
}

// --- the projection ---------------------------------------------------------------------------

function rotate([x, y, z]) {
  // Yaw about the vertical axis, then pitch about the horizontal one.
  const x1 = x * Math.cos(yaw) + z * Math.sin(yaw);
  const z1 = -x * Math.sin(yaw) + z * Math.cos(yaw);
  const y2 = y * Math.cos(pitch) - z1 * Math.sin(pitch);
  const z2 = y * Math.sin(pitch) + z1 * Math.cos(pitch);
  return [x1, y2, z2];
}

// point (2 or 3 numbers) -> where it lands on the canvas; the cloud fills the canvas, and in 3-D
// nearer points come out bigger (depth > 1) and farther ones smaller.
function projection(points, width, height) {
  const three = result.dims === 3;
  const radius = Math.max(1e-9, ...points.map((p) => Math.hypot(...p)));
  const half = (Math.min(width, height) / 2 - PAD) * zoom;
  const distance = 3.2; // the camera's distance, in units of the cloud's radius
  return (point) => {
    const [x, y, z] = three ? rotate(point.map((v) => v / radius)) : [point[0] / radius, point[1] / radius, 0];
    const depth = three ? distance / (distance + z) : 1;
    return { x: width / 2 + x * half * depth, y: height / 2 - y * half * depth, depth, z };
  };
}

function draw() {
  if (!result) return;
  const canvas = $("embed-canvas");
  const width = Math.max(280, canvas.parentElement.clientWidth);
  const height = Math.min(560, Math.max(300, Math.round(width * 0.62)));
  const context = sizeCanvas(canvas, width, height);
  const toScreen = projection(result.points, width, height);
  drawAxes(context, toScreen, result.points);
  const drawn = result.points.map((p, index) => ({ ...toScreen(p), index }));
  drawn.sort((a, b) => b.z - a.z); // far ones first
  if (picked.length === 2) {
    const [a, b] = picked.map((i) => drawn.find((d) => d.index === i));
    context.strokeStyle = "#7c3aed";
    context.lineWidth = 1.5;
    context.setLineDash([5, 4]);
    context.beginPath();
    context.moveTo(a.x, a.y);
    context.lineTo(b.x, b.y);
    context.stroke();
    context.setLineDash([]);
  }
  context.font = "13px system-ui, sans-serif";
  context.textBaseline = "middle";
  const labels = placeLabels(context, drawn);
  for (const d of drawn) {
    const selected = picked.includes(d.index);
    const r = 4.5 * d.depth;
    context.globalAlpha = result.dims === 3 ? Math.min(1, 0.35 + 0.65 * d.depth ** 2) : 1;
    context.fillStyle = selected ? "#7c3aed" : "#1d4ed8";
    context.beginPath();
    context.arc(d.x, d.y, r, 0, 2 * Math.PI);
    context.fill();
    if (selected) {
      context.strokeStyle = "#7c3aed";
      context.lineWidth = 2;
      context.beginPath();
      context.arc(d.x, d.y, r + 4, 0, 2 * Math.PI);
      context.stroke();
    }
    context.fillStyle = selected ? "#4c1d95" : "#1f2933";
    const label = labels.get(d.index);
    context.fillText(label.text, label.x, label.y);
  }
  context.globalAlpha = 1;
  screen = drawn;
  showPair();
}

// Each point's label beside it: right, left, above or below, whichever first overlaps no label
// or point placed before it (nearest points first, so that they get the best places).
function placeLabels(context, drawn) {
  const placed = drawn.map((d) => ({ x: d.x - 6, y: d.y - 6, w: 12, h: 12 })); // the points themselves
  const labels = new Map();
  const overlaps = (a) => placed.some((b) => a.x < b.x + b.w && b.x < a.x + a.w && a.y < b.y + b.h && b.y < a.y + a.h);
  for (const d of [...drawn].reverse()) {
    const full = result.inputs[d.index];
    const text = full.length > 28 ? `${full.slice(0, 27)}…` : full;
    const w = context.measureText(text).width;
    const r = 4.5 * d.depth + 4;
    const candidates = [
      [d.x + r, d.y],
      [d.x - r - w, d.y],
      [d.x - w / 2, d.y - r - 7],
      [d.x - w / 2, d.y + r + 7],
      [d.x + r, d.y - 14],
      [d.x + r, d.y + 14],
      [d.x - r - w, d.y - 14],
      [d.x - r - w, d.y + 14],
    ];
    const boxes = candidates.map(([x, y]) => ({ x, y: y - 8, w, h: 16, at: [x, y] }));
    const box = boxes.find((b) => !overlaps(b)) || boxes[0];
    placed.push(box);
    labels.set(d.index, { text, x: box.at[0], y: box.at[1] });
  }
  return labels;
}

function drawAxes(context, toScreen, points) {
  const three = result.dims === 3;
  const reach = Math.max(...points.map((p) => Math.hypot(...p))) * 0.9;
  const origin = toScreen(three ? [0, 0, 0] : [0, 0]);
  const axes = three ? [[reach, 0, 0], [0, reach, 0], [0, 0, reach]] : [[reach, 0], [0, reach]];
  context.strokeStyle = "#9aa5b1";
  context.fillStyle = "#616e7c";
  context.lineWidth = 1;
  context.font = "11px system-ui, sans-serif";
  axes.forEach((axis, i) => {
    const end = toScreen(axis);
    const start = toScreen(axis.map((v) => -v));
    context.beginPath();
    context.moveTo(start.x, start.y);
    context.lineTo(end.x, end.y);
    context.stroke();
    context.fillText(`PC${i + 1}`, end.x + 4, end.y - 4);
  });
  context.fillStyle = "#9aa5b1";
  context.beginPath();
  context.arc(origin.x, origin.y, 2, 0, 2 * Math.PI);
  context.fill();
}

// --- comparing two points ---------------------------------------------------------------------

function showPair() {
  const node = $("embed-pair");
  if (picked.length < 2) {
    node.textContent = picked.length ? `Picked “${result.inputs[picked[0]]}”: click another point.` : "";
    return;
  }
  const [a, b] = picked;
  node.replaceChildren(
    `“${result.inputs[a]}” and “${result.inputs[b]}”: cosine `,
    h("strong", {}, result.cosine[a][b].toFixed(3)),
    ", angle ",
    h("strong", {}, `${result.angle_degrees[a][b].toFixed(1)}°`),
    " (between the full vectors; the plot is a projection).",
  );
}

function pickAt(event) {
  const box = $("embed-canvas").getBoundingClientRect();
  const x = event.clientX - box.left;
  const y = event.clientY - box.top;
  let best = null;
  for (const d of screen) {
    const distance = Math.hypot(d.x - x, d.y - y);
    if (distance < 14 && (!best || distance < best.distance)) best = { index: d.index, distance };
  }
  if (!best) return;
  picked = picked.includes(best.index) ? picked.filter((i) => i !== best.index) : [...picked, best.index].slice(-2);
  draw();
  drawMatrix();
}

function drawMatrix() {
  const node = $("embed-matrix");
  const n = result.inputs.length;
  if (n > MATRIX_LIMIT) {
    node.replaceChildren(h("p", { class: "hint" }, `The cosine table is shown for up to ${MATRIX_LIMIT} inputs.`));
    return;
  }
  const short = (s) => (s.length > 12 ? `${s.slice(0, 11)}…` : s);
  const header = h("tr", {}, h("th", {}), result.inputs.map((s) => h("th", { scope: "col", title: s }, short(s))));
  const rows = result.inputs.map((s, i) =>
    h(
      "tr",
      {},
      h("th", { scope: "row", title: s }, short(s)),
      result.inputs.map((t, j) => {
        const c = result.cosine[i][j];
        const selected = picked.length === 2 && ((picked[0] === i && picked[1] === j) || (picked[0] === j && picked[1] === i));
        const td = h("td", { style: `background: ${css(cosineColor(c))}`, class: selected ? "selected" : null, title: `${s} · ${t}: cosine ${c.toFixed(3)}, angle ${result.angle_degrees[i][j].toFixed(1)}°` }, c.toFixed(2));
        td.addEventListener("click", () => {
          picked = i === j ? [i] : [i, j];
          draw();
          drawMatrix();
        });
        return td;
      }),
    ),
  );
  node.replaceChildren(h("table", { class: "cosines", "aria-label": "Cosine similarity between every two inputs" }, header, ...rows), legend("cosine similarity", (c) => css(cosineColor(c)), -1, 1, "-1", "+1"));
}

// --- wiring -----------------------------------------------------------------------------------

function wireRotation() {
  const canvas = $("embed-canvas");
  let drag = null;
  canvas.addEventListener("pointerdown", (event) => {
    drag = { x: event.clientX, y: event.clientY, moved: false };
    canvas.setPointerCapture(event.pointerId);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!drag || !result || result.dims !== 3) return;
    const dx = event.clientX - drag.x;
    const dy = event.clientY - drag.y;
    if (Math.abs(dx) + Math.abs(dy) < 2) return;
    drag = { x: event.clientX, y: event.clientY, moved: true };
    yaw += dx * 0.01;
    pitch = Math.max(-1.5, Math.min(1.5, pitch + dy * 0.01));
    draw();
  });
  canvas.addEventListener("pointerup", (event) => {
    if (drag && !drag.moved) pickAt(event);
    drag = null;
  });
  canvas.addEventListener(
    "wheel",
    (event) => {
      if (!result) return;
      event.preventDefault();
      zoom = Math.min(8, Math.max(0.5, zoom * Math.exp(-event.deltaY * 0.001)));
      draw();
    },
    { passive: false },
  );
  canvas.addEventListener("keydown", (event) => {
    if ((event.key === "+" || event.key === "-") && result) {
      zoom = Math.min(8, Math.max(0.5, zoom * (event.key === "+" ? 1.25 : 0.8)));
      draw();
      return;
    }
    const turn = { ArrowLeft: [-0.1, 0], ArrowRight: [0.1, 0], ArrowUp: [0, -0.1], ArrowDown: [0, 0.1] }[event.key];
    if (!turn || !result || result.dims !== 3) return;
    event.preventDefault();
    yaw += turn[0];
    pitch = Math.max(-1.5, Math.min(1.5, pitch + turn[1]));
    draw();
  });
}

export function setup() {
  $("embed-run").addEventListener("click", place);
  for (const radio of document.querySelectorAll('input[name="dims"]')) radio.addEventListener("change", () => result && place());
  wireRotation();
  window.addEventListener("resize", () => !$("view-embeddings").hidden && draw());
  on("view", (view) => {
    if (view === "embeddings") draw();
  });
  on("model", () => {
    result = null;
    $("embed-canvas").getContext("2d").clearRect(0, 0, $("embed-canvas").width, $("embed-canvas").height);
    $("embed-pair").textContent = "";
    $("embed-matrix").replaceChildren();
    $("embed-source").textContent = "";
  });
}
