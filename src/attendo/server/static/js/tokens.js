// The Tokens view: any text, and the last generation's prompt and output, as the model's tokens
// (from /tokenize with return_token_strs, and the generation's own token strings): one box per
// token, its id on hover, whitespace and byte-fallback pieces shown as what they are.

import { postJSON } from "./api.js";
import { $, clearError, h, reportError, tokenText, withTip } from "./dom.js";
import { on, state } from "./state.js";

function showIds() {
  return $("show-ids").checked;
}

export function tokenBox(id, text, index) {
  const box = h("span", { class: `tok-box ${index % 2 ? "odd" : "even"}`, tabindex: 0 }, h("span", { class: "tok" }, tokenText(text)));
  if (showIds() && id !== null) box.append(h("span", { class: "tok-id" }, String(id)));
  return withTip(box, () => [h("div", {}, `token ${index}`), h("div", { class: "tip-token" }, "id ", h("strong", {}, String(id)), " · ", h("span", { class: "tok" }, tokenText(text)))]);
}

function renderTokens(container, ids, strings) {
  container.replaceChildren(...ids.map((id, i) => tokenBox(id, strings[i], i)));
}

// Opening the view, ticking "ids" and clicking Tokenize each ask again: only the latest answer is
// shown, whichever order the answers come back in.
let latestTokenize = 0;

async function tokenizeText() {
  if (!state.model) return;
  clearError();
  const text = $("tokenize-text").value;
  const asked = ++latestTokenize;
  try {
    const result = await postJSON("tokenize", { model: state.model, prompt: text, return_token_strs: true });
    if (asked !== latestTokenize) return;
    renderTokens($("tokenized"), result.tokens, result.token_strs);
    const chars = [...text].length;
    $("tokenize-stats").textContent = `${result.count} tokens · ${chars} characters · ${(chars / Math.max(1, result.count)).toFixed(2)} characters per token`;
  } catch (error) {
    reportError(error);
  }
}

let shownGeneration = null;

async function renderGeneration() {
  const record = state.generation;
  if (!record || record === shownGeneration || $("view-tokens").hidden) return;
  shownGeneration = record;
  $("generation-tokens-empty").hidden = true;
  $("prompt-tokens-title").hidden = false;
  $("output-tokens-title").hidden = false;
  renderTokens($("output-tokens"), record.tokens.map((t) => t.id), record.tokens.map((t) => t.text));
  const body = record.mode === "chat" ? { messages: JSON.parse(record.promptText) } : { prompt: record.promptText };
  try {
    const result = await postJSON("tokenize", { model: record.model, ...body, return_token_strs: true });
    renderTokens($("prompt-tokens"), result.tokens, result.token_strs);
    $("prompt-tokens-title").textContent = `Prompt · ${result.count} tokens`;
    $("output-tokens-title").textContent = `Output · ${record.tokens.length} tokens`;
  } catch (error) {
    reportError(error);
  }
}

export function setup() {
  $("tokenize").addEventListener("click", tokenizeText);
  $("tokenize-text").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) tokenizeText();
  });
  $("show-ids").addEventListener("change", () => {
    shownGeneration = null;
    renderGeneration();
    if ($("tokenized").childElementCount) tokenizeText();
  });
  on("generation", () => renderGeneration());
  on("view", (view) => {
    if (view !== "tokens") return;
    renderGeneration();
    if (!$("tokenized").childElementCount) tokenizeText();
  });
  on("model", () => {
    if (!$("view-tokens").hidden) tokenizeText();
    else $("tokenized").replaceChildren();
  });
}
