// The Sampling stages view: for one step of a generation, the next-token distribution after
// each stage of the sampler (raw softmax → penalties → [grammar] → temperature → top-k → top-p →
// min-p → final), from POST /v1/inspect/stages. Rows are tokens, columns are stages; a dashed line
// marks where a stage cut the list. The sliders ask again with other settings: the server keeps
// the step's logits, so only the sampler runs. Picking another row and "Continue from here"
// branches the generation with that token.

import { postJSON } from "./api.js";
import { $, clearError, clickable, flowText, h, percent, reportError, tokenText } from "./dom.js";
import { branch } from "./generate.js";
import { emit, on, state } from "./state.js";

const TITLES = {
  raw: "raw softmax",
  penalties: "penalties",
  grammar: "grammar",
  temperature: "temperature",
  top_k: "top-k",
  top_p: "top-p",
  min_p: "min-p",
  final: "final",
};
const SLIDERS = ["temperature", "top_k", "top_p", "min_p", "repetition_penalty", "top"];

let shownRecord = null;
let alternative = null; // {id, token, p} picked by the user
let inFlight = false;
let again = false; // a slider moved while a request was out: ask once more when it returns
let changedAt = null; // when the slider moved (performance.now), for the redraw time

// --- settings ---------------------------------------------------------------------------------

function sliderSettings() {
  const f = $("stage-controls").elements;
  const base = shownRecord ? shownRecord.settings : {};
  return {
    do_sample: f.do_sample.checked,
    temperature: Number(f.temperature.value),
    top_k: Number(f.top_k.value),
    top_p: Number(f.top_p.value),
    min_p: Number(f.min_p.value),
    repetition_penalty: Number(f.repetition_penalty.value),
    presence_penalty: base.presence_penalty ?? 0,
    frequency_penalty: base.frequency_penalty ?? 0,
  };
}

function showSliderValues() {
  const f = $("stage-controls").elements;
  const off = { top_k: 0, top_p: 1, min_p: 0, repetition_penalty: 1 };
  for (const name of SLIDERS) {
    const input = f[name];
    const value = Number(input.value);
    input.nextElementSibling.textContent = off[name] === value ? "off" : String(value);
  }
  for (const name of ["temperature", "top_k", "top_p", "min_p"]) f[name].disabled = !f.do_sample.checked;
}

function loadSettings(settings) {
  const f = $("stage-controls").elements;
  f.do_sample.checked = Boolean(settings.do_sample);
  f.temperature.value = settings.temperature ?? 1;
  f.top_k.value = settings.top_k ?? 0;
  f.top_p.value = settings.top_p ?? 1;
  f.min_p.value = settings.min_p ?? 0;
  f.repetition_penalty.value = settings.repetition_penalty ?? 1;
  showSliderValues();
}

function settingLabel(name, settings) {
  if (name === "temperature") return settings.do_sample ? `${TITLES[name]} ${settings.temperature}` : `${TITLES[name]} (greedy: off)`;
  if (name === "top_k") return settings.do_sample && settings.top_k > 0 ? `top-k ${settings.top_k}` : "top-k off";
  if (name === "top_p") return settings.do_sample && settings.top_p < 1 ? `top-p ${settings.top_p}` : "top-p off";
  if (name === "min_p") return settings.do_sample && settings.min_p > 0 ? `min-p ${settings.min_p}` : "min-p off";
  if (name === "penalties") return settings.repetition_penalty !== 1 || settings.presence_penalty || settings.frequency_penalty ? `penalties (×${settings.repetition_penalty})` : "penalties off";
  if (name === "final") return settings.do_sample ? "final: drawn from" : "final: greedy (argmax)";
  return TITLES[name] || name;
}

// --- the request ------------------------------------------------------------------------------

function context(record, step) {
  return [...record.promptIds, ...record.tokens.slice(0, step).map((t) => t.id)];
}

async function refresh() {
  const record = shownRecord;
  const step = state.step;
  if (!record || step === null) return;
  if (inFlight) {
    again = true;
    return;
  }
  inFlight = true;
  again = false;
  const settings = sliderSettings();
  const body = {
    model: record.model,
    token_ids: context(record, step),
    settings,
    top: Number($("stage-controls").elements.top.value),
    chosen: record.tokens[step].id,
  };
  const started = changedAt ?? performance.now();
  changedAt = null;
  try {
    const response = await postJSON("v1/inspect/stages", body);
    if (record === shownRecord && step === state.step) {
      draw(response, settings);
      const ms = performance.now() - started;
      const table = $("stages-table");
      table.dataset.ms = ms.toFixed(1);
      table.dataset.renders = String(Number(table.dataset.renders || 0) + 1);
      $("stages-timing").textContent = `redrawn in ${Math.round(ms)} ms${response.reused_logits ? " (stored logits: the sampler only)" : " (one forward pass)"}`;
      clearError();
    }
  } catch (error) {
    reportError(error);
  } finally {
    inFlight = false;
    if (again) refresh();
  }
}

// --- drawing ----------------------------------------------------------------------------------

// Every token any stage lists, in the order the filters act on (the penalties stage's, which the
// temperature keeps), the rest after by their raw probability.
function rowsOf(stages) {
  const byId = new Map();
  stages.forEach((stage, s) => {
    for (const t of stage.tokens) {
      if (!byId.has(t.id)) byId.set(t.id, { id: t.id, token: t.token, p: new Array(stages.length).fill(undefined) });
      byId.get(t.id).p[s] = t.p;
    }
  });
  // A stage that lists all it kept tells us every token it does not list has p = 0.
  stages.forEach((stage, s) => {
    const complete = stage.tokens.filter((t) => t.p > 0).length >= stage.kept;
    for (const row of byId.values()) if (row.p[s] === undefined && complete) row.p[s] = 0;
  });
  const order = stages.findIndex((s) => s.name === "penalties");
  const key = (row) => [row.p[order >= 0 ? order : 0] ?? -1, row.p[0] ?? -1];
  return [...byId.values()].sort((a, b) => {
    const [a1, a2] = key(a);
    const [b1, b2] = key(b);
    return b1 - a1 || b2 - a2;
  });
}

function stageHeader(stage, settings) {
  const cut = stage.threshold !== null && stage.threshold !== undefined;
  return h(
    "div",
    { class: "st-head", role: "columnheader", dataset: { stage: stage.name } },
    h("div", { class: "st-name" }, settingLabel(stage.name, settings)),
    h("div", { class: "st-stats" }, `${stage.kept.toLocaleString()} kept`),
    h("div", { class: "st-entropy" }, `entropy ${stage.entropy.toFixed(2)} bits`),
    h("div", { class: cut ? "st-cut" : "st-uncut" }, cut ? `cut below p ${percent(stage.threshold)}, kept ${percent(stage.mass)} of the mass` : "nothing cut"),
  );
}

function cell(row, s, rows, r) {
  const p = row.p[s];
  const before = s > 0 ? row.p[s - 1] : undefined;
  const node = h("div", { class: "st-cell", role: "cell", dataset: { p: p === undefined ? "" : String(p) } });
  if (p === undefined) {
    node.classList.add("unknown");
    node.title = "below the listed tokens at this stage";
    node.append(h("span", { class: "st-value" }, "·"));
    return node;
  }
  if (p === 0 && before > 0) {
    node.classList.add("dropped");
    node.append(h("span", { class: "st-ghost", style: `width: ${Math.max(1, before * 100)}%` }), h("span", { class: "st-value" }, "cut"));
    return node;
  }
  if (p === 0) {
    node.classList.add("gone");
    node.append(h("span", { class: "st-value" }, "–"));
    return node;
  }
  const next = rows[r + 1];
  if (next && next.p[s] === 0 && next.p[s - 1] > 0) node.classList.add("cut-below");
  node.append(h("span", { class: "st-bar", style: `width: ${Math.max(0.5, p * 100)}%` }), h("span", { class: "st-value" }, percent(p)));
  return node;
}

function draw(response, settings) {
  const stages = response.stages;
  const rows = rowsOf(stages);
  const chosenId = response.chosen ? response.chosen.id : null;
  const table = $("stages-table");
  table.style.setProperty("--stages", String(stages.length));
  const header = h("div", { class: "st-row st-header", role: "row" }, h("div", { class: "st-label", role: "columnheader" }, "token"), stages.map((s) => stageHeader(s, settings)));
  const body = rows.map((row, r) => {
    const chosen = row.id === chosenId;
    const picked = alternative && alternative.id === row.id;
    const label = h(
      "div",
      { class: "st-label", role: "rowheader", title: `id ${row.id}` },
      h("span", { class: "st-mark" }, chosen ? "★" : ""),
      h("span", { class: "tok" }, tokenText(row.token)),
    );
    const line = h("div", { class: `st-row${chosen ? " chosen" : ""}${picked ? " picked" : ""}`, role: "row", dataset: { id: row.id } }, label, stages.map((_, s) => cell(row, s, rows, r)));
    clickable(line, () => pick(row, chosen));
    line.setAttribute("aria-label", `${row.token} id ${row.id}${chosen ? ", the token taken" : ""}`);
    return line;
  });
  table.replaceChildren(header, ...body);
  summarize(response, settings);
}

function summarize(response, settings) {
  const record = shownRecord;
  const step = state.step;
  const chosen = response.chosen;
  const final = response.stages[response.stages.length - 1];
  const raw = response.stages[0];
  const parts = [`Step ${step + 1} of ${record.tokens.length}: the model took `, h("span", { class: "tok chip" }, tokenText(record.tokens[step].text))];
  if (chosen) parts.push(` (raw p ${percent(raw.tokens.find((t) => t.id === chosen.id)?.p ?? chosen.p)}, final p ${percent(chosen.p)})`);
  parts.push(`. ${settings.do_sample ? `Sampling from ${final.kept.toLocaleString()} of ${response.vocab_size.toLocaleString()} tokens` : "Greedy: the most likely token"}, entropy ${raw.entropy.toFixed(2)} → ${final.entropy.toFixed(2)} bits.`);
  $("stages-summary").replaceChildren(...parts);
}

// The row the user picked to continue from (null: none, or the token taken itself).
function pick(row, chosen) {
  alternative = !row || chosen ? null : { id: row.id, token: row.token, p: row.p[0] };
  for (const line of $("stages-table").querySelectorAll(".st-row[data-id]")) line.classList.toggle("picked", alternative !== null && Number(line.dataset.id) === alternative.id);
  const button = $("branch");
  button.disabled = alternative === null;
  button.replaceChildren(...(alternative ? ["Continue from here with ", h("span", { class: "tok chip" }, tokenText(alternative.token))] : ["Continue from here with this token"]));
}

// --- the steps strip --------------------------------------------------------------------------

function promptTail(record) {
  let text = record.promptText;
  if (record.mode === "chat") {
    const messages = JSON.parse(record.promptText);
    text = messages[messages.length - 1].content;
  }
  return text.length > 160 ? `…${text.slice(-160)}` : text;
}

function drawSteps() {
  const record = shownRecord;
  const strip = $("stages-steps");
  if (!record) return;
  const chips = record.tokens.map((t, i) => {
    const chip = h("span", { class: `step-token${i === state.step ? " current" : ""}${t.branched ? " branched" : ""}`, dataset: { step: i }, title: `step ${i + 1} · id ${t.id}` }, flowText(t.text));
    if (/^\s*\n\s*$/.test(t.text)) chip.classList.add("newline"); // drawn with a ↵ (CSS), so that it can be clicked
    return clickable(chip, () => emit("step", i));
  });
  strip.replaceChildren(h("span", { class: "prompt-text" }, promptTail(record)), ...chips);
}

function showStep(step) {
  if (!shownRecord || step === null) return;
  state.step = step;
  pick(null, false);
  $("stages-empty").hidden = true;
  $("stages-body").hidden = false;
  drawSteps();
  refresh();
}

function useGeneration(record) {
  if (record === shownRecord) return;
  shownRecord = record;
  if (record) loadSettings(record.settings);
  $("stages-table").replaceChildren();
  $("stages-summary").replaceChildren();
  if (state.step === null) {
    drawSteps();
    $("stages-empty").hidden = false;
    $("stages-empty").textContent = "Click a token above to see the sampler's stages at that step.";
    $("stages-body").hidden = true;
  }
}

export function setup() {
  const form = $("stage-controls");
  form.addEventListener("submit", (event) => event.preventDefault());
  form.addEventListener("input", () => {
    showSliderValues();
    changedAt = performance.now();
    refresh();
  });
  $("stages-reset").addEventListener("click", () => {
    if (!shownRecord) return;
    loadSettings(shownRecord.settings);
    refresh();
  });
  $("branch").addEventListener("click", () => {
    if (!alternative || !shownRecord) return;
    clearError();
    const token = { id: alternative.id, text: alternative.token, logprob: alternative.p > 0 ? Math.log(alternative.p) : null };
    const settings = { ...sliderSettings() };
    branch(shownRecord, state.step, token, settings).catch(reportError);
  });
  on("generation", (record) => useGeneration(record));
  on("step", (step) => showStep(step));
  showSliderValues();
}
