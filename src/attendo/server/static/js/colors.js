// The page's colour scales. Each encodes one quantity and is drawn with a legend:
// attention weight (white to deep blue), a token's probability under the model (orange for the
// unlikely ones, none for the likely), and cosine similarity (orange -1, white 0, purple +1).

import { h } from "./dom.js";

function ramp(stops) {
  // stops: [[r, g, b], ...] evenly spaced over 0..1; returns t -> [r, g, b]
  return (t) => {
    const x = Math.min(1, Math.max(0, t)) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(x));
    const f = x - i;
    return stops[i].map((c, k) => Math.round(c + (stops[i + 1][k] - c) * f));
  };
}

export const attentionColor = ramp([
  [255, 255, 255],
  [198, 219, 239],
  [107, 174, 214],
  [33, 113, 181],
  [8, 48, 107],
]);

export const cosineColor = (c) =>
  ramp([
    [179, 88, 6],
    [253, 184, 99],
    [255, 255, 255],
    [178, 171, 210],
    [84, 39, 136],
  ])((c + 1) / 2);

// Orange whose strength grows as the probability falls: surprising tokens stand out.
export function surpriseColor(p) {
  const alpha = Math.min(0.85, Math.max(0, 1 - p) ** 1.5 * 0.85);
  return `rgba(245, 124, 0, ${alpha.toFixed(3)})`;
}

export const css = ([r, g, b]) => `rgb(${r}, ${g}, ${b})`;

// A horizontal colour bar with its end labels and a caption.
export function legend(caption, color, low, high, lowLabel = String(low), highLabel = String(high)) {
  const canvas = h("canvas", { width: 160, height: 12, class: "legend-bar", "aria-hidden": "true" });
  const context = canvas.getContext("2d");
  for (let x = 0; x < 160; x++) {
    context.fillStyle = color(low + ((high - low) * x) / 159);
    context.fillRect(x, 0, 1, 12);
  }
  return h("span", { class: "legend" }, h("span", { class: "legend-caption" }, caption), h("span", { class: "legend-end" }, lowLabel), canvas, h("span", { class: "legend-end" }, highLabel));
}
