// Small DOM helpers. Every piece of model or user text goes into the page as a text node
// (textContent), never as HTML: a model that writes <script> shows it as characters.

export const $ = (id) => document.getElementById(id);

// h("div", {class: "x", onclick: f}, "text", child, ...): an element with attributes, listeners
// (on* keys), and children (strings become text nodes; null and false are skipped).
export function h(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else if (key === "dataset") Object.assign(node.dataset, value);
    else if (key === "style") node.style.cssText = value;
    else node.setAttribute(key, value === true ? "" : String(value));
  }
  append(node, children);
  return node;
}

function append(node, children) {
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

export function replaceChildren(node, ...children) {
  node.replaceChildren();
  append(node, children);
}

const BYTE_PIECE = /^<0x[0-9A-Fa-f]{2}>$/;
const BYTE_PIECES = /(<0x[0-9A-Fa-f]{2}>)/;

// Other control characters as their Unicode pictures (U+0011 as ␑), or null.
function control(ch) {
  const code = ch.codePointAt(0);
  return code < 0x20 ? String.fromCodePoint(0x2400 + code) : code === 0x7f ? "␡" : null;
}

// A token's string as a fragment: spaces, newlines and tabs as visible marks, byte-fallback
// pieces (<0xF0>) in their own style, control characters as pictures, so that a token's
// boundaries and whitespace are honest.
export function tokenText(text) {
  const fragment = document.createDocumentFragment();
  if (text === "") {
    fragment.append(h("span", { class: "ws-mark" }, "∅"));
    return fragment;
  }
  for (const piece of text.split(BYTE_PIECES)) {
    if (BYTE_PIECE.test(piece)) fragment.append(h("span", { class: "byte" }, piece));
    else appendMarked(fragment, piece);
  }
  return fragment;
}

function appendMarked(fragment, text) {
  let plain = "";
  const flush = () => {
    if (plain) fragment.append(document.createTextNode(plain));
    plain = "";
  };
  for (const ch of text) {
    const mark = ch === " " ? "·" : ch === "\n" ? "↵" : ch === "\t" ? "⇥" : control(ch);
    if (mark === null) {
      plain += ch;
      continue;
    }
    flush();
    fragment.append(h("span", { class: "ws-mark" }, mark));
  }
  flush();
}

// The token as it sits in running text: its own characters, with newlines kept as line breaks.
export function flowText(text) {
  const fragment = document.createDocumentFragment();
  for (const piece of text.split(BYTE_PIECES)) {
    if (piece) fragment.append(BYTE_PIECE.test(piece) ? h("span", { class: "byte" }, piece) : document.createTextNode(piece));
  }
  return fragment;
}

// A probability as a percentage with about two significant digits.
export function percent(p) {
  const pct = p * 100;
  if (pct >= 99.95) return "100%";
  if (pct >= 10) return `${pct.toFixed(1)}%`;
  if (pct >= 0.1) return `${pct.toFixed(2)}%`;
  if (pct >= 0.001) return `${pct.toPrecision(2)}%`;
  return p > 0 ? "<0.001%" : "0";
}

// One floating tooltip for the whole page; its content is built from nodes (text only).
const tip = () => $("tooltip");

export function showTip(anchor, ...content) {
  const node = tip();
  replaceChildren(node, ...content);
  node.hidden = false;
  const box = anchor.getBoundingClientRect();
  const width = node.offsetWidth;
  const left = Math.min(Math.max(4, box.left), window.innerWidth - width - 4);
  const below = box.bottom + 6 + node.offsetHeight < window.innerHeight;
  node.style.left = `${left + window.scrollX}px`;
  node.style.top = `${(below ? box.bottom + 6 : box.top - node.offsetHeight - 6) + window.scrollY}px`;
}

export function showTipAt(x, y, ...content) {
  const node = tip();
  replaceChildren(node, ...content);
  node.hidden = false;
  const left = Math.min(x + 14, window.innerWidth - node.offsetWidth - 4);
  const top = y + 16 + node.offsetHeight < window.innerHeight ? y + 16 : y - node.offsetHeight - 8;
  node.style.left = `${left + window.scrollX}px`;
  node.style.top = `${top + window.scrollY}px`;
}

export function hideTip() {
  tip().hidden = true;
}

// Hover and keyboard focus both show an element's tooltip.
export function withTip(node, content) {
  node.addEventListener("mouseenter", () => showTip(node, ...content()));
  node.addEventListener("focus", () => showTip(node, ...content()));
  node.addEventListener("mouseleave", hideTip);
  node.addEventListener("blur", hideTip);
  return node;
}

// Enter and Space activate an element that acts as a button.
export function clickable(node, action) {
  node.tabIndex = 0;
  node.setAttribute("role", "button");
  node.addEventListener("click", action);
  node.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      action(event);
    }
  });
  return node;
}

// A canvas sized for the device's pixels; returns its 2-D context scaled to CSS pixels.
export function sizeCanvas(canvas, width, height) {
  const ratio = window.devicePixelRatio || 1;
  canvas.style.width = `${width}px`;
  canvas.style.height = `${height}px`;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  return context;
}

// The page's error banner: the server's own message, shown until dismissed or replaced.
export function reportError(error) {
  if (error && error.name === "AbortError") return;
  console.error(error);
  $("error-text").textContent = error && error.message ? error.message : String(error);
  $("error").hidden = false;
}

export function clearError() {
  $("error").hidden = true;
}
