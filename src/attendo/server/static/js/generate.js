// The Generate view: completion and chat against /v1/completions and /v1/chat/completions,
// streamed, with every sampler control, a Stop button that aborts the request (the server frees
// the slot), token counts and speed. Each generation becomes a record that the Tokens, Stages and
// Attention views inspect; "continue from here" in the Stages view comes back here as `branch`.

import { postStream } from "./api.js";
import { surpriseColor, legend } from "./colors.js";
import { $, clearError, clickable, flowText, h, percent, reportError, tokenText, withTip } from "./dom.js";
import { emit, generates, on, state } from "./state.js";

const TOP_ALTERNATIVES = 5;

let running = null; // {controller, record}
let conversation = []; // chat mode: [{role, content, record?}]

// --- settings ---------------------------------------------------------------------------------

function number(name) {
  const value = $("controls").elements[name].value.trim();
  return value === "" ? null : Number(value);
}

function mode() {
  return $("controls").elements.mode.value;
}

// The sampler settings as the stages route names them; every one is sent explicitly, so that the
// model's own defaults never make the server sample differently from what the page records.
export function formSettings() {
  const sample = $("controls").elements.decoding.value === "sample";
  return {
    do_sample: sample,
    temperature: sample ? number("temperature") ?? 1 : 1,
    top_k: sample ? number("top_k") ?? 0 : 0,
    top_p: sample ? number("top_p") ?? 1 : 1,
    min_p: sample ? number("min_p") ?? 0 : 0,
    repetition_penalty: number("repetition_penalty") ?? 1,
    presence_penalty: number("presence_penalty") ?? 0,
    frequency_penalty: number("frequency_penalty") ?? 0,
  };
}

function stopStrings() {
  return $("controls")
    .elements.stop.value.split("\n")
    .filter((line) => line !== "")
    .map((line) => line.replaceAll("\\n", "\n").replaceAll("\\t", "\t"));
}

// The request fields shared by completions and chat.
function requestFields(settings, maxTokens, seed, stop) {
  const fields = {
    model: state.model,
    max_tokens: maxTokens,
    stream: true,
    stream_options: { include_usage: true },
    return_token_ids: true,
    temperature: settings.do_sample ? settings.temperature : 0,
    top_k: settings.top_k,
    top_p: settings.top_p,
    min_p: settings.min_p,
    repetition_penalty: settings.repetition_penalty,
    presence_penalty: settings.presence_penalty,
    frequency_penalty: settings.frequency_penalty,
  };
  if (seed !== null && settings.do_sample) fields.seed = seed;
  if (stop.length) fields.stop = stop;
  return fields;
}

// --- records and their rendering --------------------------------------------------------------

// A generation: the prompt's ids, each generated token ({id, text, logprob, top}) and the text
// the server sent, grouped as it came: a group is one chunk's text and the tokens it carries.
function newRecord(kind, promptText, settings, request) {
  return { model: state.model, mode: kind, promptText, promptIds: null, tokens: [], groups: [], settings, request, finish: null, text: "" };
}

function topAlternatives(entry) {
  if (!entry) return [];
  if (Array.isArray(entry.top_logprobs)) return entry.top_logprobs.map((t) => ({ token: t.token, p: Math.exp(t.logprob) }));
  return Object.entries(entry.top_logprobs || {}).map(([token, lp]) => ({ token, p: Math.exp(lp) }));
}

function tokenTip(record, index) {
  const token = record.tokens[index];
  const lines = [h("div", { class: "tip-token" }, h("span", { class: "tok" }, tokenText(token.text)), token.id !== null ? ` id ${token.id}` : "")];
  if (token.logprob !== null) lines.push(h("div", {}, `p = ${percent(Math.exp(token.logprob))} under the model`));
  if (token.branched) lines.push(h("div", { class: "hint" }, "chosen by you (continue from here)"));
  if (token.top.length) {
    lines.push(
      h(
        "table",
        { class: "tip-top" },
        token.top.map((t) => h("tr", {}, h("td", { class: "tok" }, tokenText(t.token)), h("td", { class: "num" }, percent(t.p)))),
      ),
    );
  }
  if (token.id !== null) lines.push(h("div", { class: "hint" }, "click: the sampling stages of this step"));
  return lines;
}

function openStep(record, index) {
  if (record.tokens[index].id === null) return;
  state.generation = record;
  state.step = index;
  emit("generation", record);
  emit("step", index);
  emit("show", "stages");
}

function tint(record, indices) {
  if (!$("controls").elements.tint.checked) return null;
  const ps = indices.map((i) => record.tokens[i].logprob).filter((lp) => lp !== null).map(Math.exp);
  return ps.length ? `background-color: ${surpriseColor(Math.min(...ps))}` : null;
}

// One group's span: a single token, or (when a chunk's text carries several, e.g. the bytes of
// one emoji) one span for all of them that opens the first.
function groupNode(record, group) {
  const indices = Array.from({ length: group.count }, (_, k) => group.first + k);
  const node = h("span", { class: "gen-token", style: tint(record, indices), dataset: { step: group.first } }, flowText(group.text));
  if (record.tokens[group.first]?.branched) node.classList.add("branched");
  if (/^\s*\n\s*$/.test(group.text)) node.classList.add("newline"); // drawn with a ↵ (CSS), so that it can be clicked
  if (!indices.length) return node;
  withTip(node, () => indices.flatMap((i, k) => (k ? [h("hr"), ...tokenTip(record, i)] : tokenTip(record, i))));
  if (record.tokens[group.first].id !== null) clickable(node, () => openStep(record, group.first));
  return node;
}

function renderRecord(container, record) {
  container.replaceChildren(...record.groups.map((g) => groupNode(record, g)));
}

// --- streaming --------------------------------------------------------------------------------

// Reads one streamed chunk's choice into the record; returns the group it added (or null).
function absorb(record, chunk, choice, text) {
  const ids = choice.token_ids ?? null;
  const strings = choice.tokens ?? null;
  const prompt = chunk.prompt_token_ids ?? choice.prompt_token_ids;
  if (prompt && !record.promptIds) record.promptIds = prompt;
  let entries = [];
  if (choice.logprobs && Array.isArray(choice.logprobs.content)) entries = choice.logprobs.content.map((e) => ({ token: e.token, logprob: e.logprob, top_logprobs: e.top_logprobs }));
  else if (choice.logprobs && choice.logprobs.tokens) {
    const lp = choice.logprobs;
    entries = lp.tokens.map((token, k) => ({ token, logprob: lp.token_logprobs[k], top_logprobs: lp.top_logprobs[k] }));
  }
  const first = record.tokens.length;
  const count = ids ? ids.length : entries.length; // without token ids (an older server), logprobs still name the tokens
  for (let k = 0; k < count; k++) {
    const entry = entries[k];
    record.tokens.push({
      id: ids ? ids[k] : null,
      text: strings ? strings[k] : entry ? entry.token : "",
      logprob: entry ? entry.logprob : null,
      top: topAlternatives(entry),
    });
  }
  if (!text && !count) return null;
  record.text += text;
  const last = record.groups[record.groups.length - 1];
  if (!count && last) {
    last.text += text; // text without a new token (released hold-back) belongs to the tokens before it
    return last;
  }
  const group = { text, first, count };
  record.groups.push(group);
  return group;
}

// Counts and speed; a branch counts its kept tokens as generated, but only this run's in tokens/s.
function showStats(record, timing, done) {
  const prompt = record.promptIds ? record.promptIds.length : record.usage ? record.usage.prompt_tokens : null;
  const parts = [];
  if (prompt !== null) parts.push(`${prompt} prompt tokens`);
  parts.push(`${record.tokens.length} generated`);
  if (timing.first !== null) parts.push(`first token ${Math.round(timing.first - timing.start)} ms`);
  if (timing.tokens > 1 && timing.last > timing.first) parts.push(`${((timing.tokens - 1) / ((timing.last - timing.first) / 1000)).toFixed(1)} tokens/s`);
  if (done) parts.push(done);
  $("stats").textContent = parts.join(" · ");
}

// Streams one request into `record`, drawing into `container` as chunks arrive.
async function run(path, body, record, container) {
  const controller = new AbortController();
  running = { controller, record };
  setRunning(true);
  clearError();
  const timing = { start: performance.now(), first: null, last: null, tokens: 0 };
  $("stats").textContent = "waiting for the first token…";
  let outcome = "";
  try {
    await postStream(
      path,
      body,
      (chunk) => {
        if (chunk.usage) record.usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const text = choice.text ?? choice.delta?.content ?? "";
          const before = { tokens: record.tokens.length, groups: record.groups.length };
          const group = absorb(record, chunk, choice, text);
          if (record.tokens.length > before.tokens) {
            timing.tokens += record.tokens.length - before.tokens;
            timing.last = performance.now();
            if (timing.first === null) timing.first = timing.last;
          }
          if (choice.finish_reason) record.finish = choice.finish_reason;
          if (!group) continue;
          const node = groupNode(record, group);
          if (record.groups.length > before.groups || !container.lastChild) container.append(node);
          else container.lastChild.replaceWith(node); // the last group's text grew
        }
        showStats(record, timing, "");
      },
      controller.signal,
    );
    outcome = record.finish === "stop" ? "finished (stop)" : record.finish === "length" ? "finished (max tokens)" : "finished";
  } catch (error) {
    if (error.name === "AbortError") outcome = "stopped";
    else {
      outcome = "failed";
      reportError(error);
    }
  } finally {
    running = null;
    setRunning(false);
  }
  renderRecord(container, record);
  showStats(record, timing, outcome);
  if (record.tokens.length && record.promptIds) {
    state.generation = record;
    state.step = null;
    emit("generation", record);
  }
  return outcome;
}

function setRunning(on) {
  $("generate").disabled = on || !generates();
  $("stop").disabled = !on;
  $("controls").setAttribute("aria-busy", String(on));
}

export function stop() {
  if (running) running.controller.abort();
}

// --- completion and chat ----------------------------------------------------------------------

function completionPrompt(text) {
  return h("span", { class: "prompt-text" }, text);
}

async function generateCompletion() {
  const prompt = $("prompt").value;
  const settings = formSettings();
  const request = { maxTokens: number("max_tokens") ?? 16, seed: number("seed"), stop: stopStrings() };
  const record = newRecord("completion", prompt, settings, request);
  const body = { ...requestFields(settings, request.maxTokens, request.seed, request.stop), prompt, logprobs: TOP_ALTERNATIVES };
  const output = $("output");
  const generated = h("span", { class: "generated" });
  output.replaceChildren(completionPrompt(prompt), generated);
  await run("v1/completions", body, record, generated);
}

function messagesForRequest() {
  const system = $("system").value.trim();
  const messages = conversation.map((m) => ({ role: m.role, content: m.content }));
  return system ? [{ role: "system", content: system }, ...messages] : messages;
}

function messageNode(message) {
  const body = h("div", { class: "message-body" });
  if (message.record) renderRecord(body, message.record);
  else body.textContent = message.content;
  return h("div", { class: `message ${message.role}` }, h("div", { class: "role" }, message.role), body);
}

function renderConversation() {
  $("conversation").replaceChildren(...conversation.map(messageNode));
}

async function generateChat() {
  const text = $("user-message").value;
  if (!text.trim()) {
    reportError(new Error("Write a message first."));
    return;
  }
  conversation.push({ role: "user", content: text });
  await continueChat(formSettings(), { maxTokens: number("max_tokens") ?? 64, seed: number("seed"), stop: stopStrings() });
  $("user-message").value = "";
}

async function continueChat(settings, request, prefix = null) {
  const messages = messagesForRequest();
  const assistant = { role: "assistant", content: "", record: null };
  renderConversation();
  const node = messageNode(assistant);
  $("conversation").append(node);
  const body = node.querySelector(".message-body");
  const record = prefix ?? newRecord("chat", JSON.stringify(messages), settings, request);
  assistant.record = record;
  let outcome;
  if (prefix) {
    outcome = await runBranch(record, body);
  } else {
    const fields = { ...requestFields(settings, request.maxTokens, request.seed, request.stop), messages, logprobs: true, top_logprobs: TOP_ALTERNATIVES };
    outcome = await run("v1/chat/completions", fields, record, body);
  }
  assistant.content = record.text;
  if (outcome !== "failed" || record.tokens.length) conversation.push(assistant);
  node.scrollIntoView({ block: "nearest" });
}

export async function generate() {
  if (running || !state.model) return;
  if (mode() === "chat") await generateChat();
  else await generateCompletion();
}

// --- continue from an alternative token -------------------------------------------------------

// A new record that keeps `record`'s prompt and tokens before `step`, takes `token` at `step`,
// and lets the model go on from there as a completion over token ids.
export async function branch(record, step, token, settings) {
  if (running) return;
  const kept = record.tokens.slice(0, step);
  const tokens = [...kept, { id: token.id, text: token.text, logprob: token.logprob ?? null, top: [], branched: true }];
  const request = { ...record.request, maxTokens: Math.max(1, record.request.maxTokens - step - 1) };
  const next = { ...newRecord(record.mode, record.promptText, settings, request), promptIds: record.promptIds, tokens };
  next.groups = kept.map((t, i) => ({ text: t.text, first: i, count: 1 }));
  next.groups.push({ text: token.text, first: step, count: 1 });
  next.text = next.groups.map((g) => g.text).join("");
  emit("show", "generate");
  if (record.mode === "chat") {
    const at = conversation.findIndex((m) => m.record === record);
    conversation = at >= 0 ? conversation.slice(0, at) : conversation;
    setMode("chat");
    await continueChat(settings, request, next);
  } else {
    setMode("completion");
    const generated = h("span", { class: "generated" });
    $("output").replaceChildren(completionPrompt(record.promptText), generated);
    await runBranch(next, generated);
  }
}

async function runBranch(record, container) {
  renderRecord(container, record);
  const context = [...record.promptIds, ...record.tokens.map((t) => t.id)];
  const r = record.request;
  const body = { ...requestFields(record.settings, r.maxTokens, r.seed, r.stop), prompt: context, logprobs: TOP_ALTERNATIVES };
  const promptIds = record.promptIds;
  const outcome = await run("v1/completions", body, record, container);
  record.promptIds = promptIds; // the server's prompt_token_ids were the whole context
  if (record.tokens.length) emit("generation", record);
  return outcome;
}

// --- wiring -----------------------------------------------------------------------------------

function setMode(kind) {
  $("controls").elements.mode.value = kind;
  $("completion-input").hidden = kind !== "completion";
  $("chat-input").hidden = kind !== "chat";
  $("clear-chat").hidden = kind !== "chat";
  $("output").hidden = kind !== "completion";
}

function syncSampling() {
  const sample = $("controls").elements.decoding.value === "sample";
  for (const input of $("controls").querySelectorAll(".sampling input")) input.disabled = !sample;
}

export function setup() {
  const form = $("controls");
  form.addEventListener("submit", (event) => event.preventDefault());
  for (const radio of form.elements.mode) radio.addEventListener("change", () => setMode(mode()));
  for (const radio of form.elements.decoding) radio.addEventListener("change", syncSampling);
  form.elements.tint.addEventListener("change", () => {
    const record = state.generation;
    if (record && mode() === "completion") renderRecord($("output").querySelector(".generated") || $("output"), record);
    renderConversation();
  });
  $("generate").addEventListener("click", () => generate().catch(reportError));
  $("stop").addEventListener("click", stop);
  $("clear-chat").addEventListener("click", () => {
    conversation = [];
    renderConversation();
  });
  for (const id of ["prompt", "user-message"]) {
    $(id).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        generate().catch(reportError);
      }
    });
  }
  document.addEventListener("keydown", (event) => {
    if (event.key === "Escape" && running) stop();
  });
  $("tint-legend").replaceChildren(legend("token probability under the model", surpriseColor, 0, 1));
  on("model", (model) => {
    const can = generates(model);
    $("generate").disabled = !can || running !== null;
    $("generate").title = can ? "Ctrl+Enter" : `${model.id} does not generate text`;
    $("generate-note").hidden = can;
    $("generate-note").textContent = can ? "" : `${model.id} is an ${model.family} model: the server generates with decoder-only models, so pick one of those here. The Tokens, Attention, Embeddings and Model views work with ${model.id}.`;
  });
  setMode(mode());
  syncSampling();
}
