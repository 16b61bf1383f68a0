// The page's start: wait for the server's models, fill the model picker, wire the tabs, the
// error banner and the API-key dialog, then let each view set itself up.

import { forgetKey, getJSON, onKeyNeeded, storedKey, storeKey } from "./api.js";
import { $, clearError, h, reportError } from "./dom.js";
import { emit, generates, on, selectedModel, state } from "./state.js";
import * as generate from "./generate.js";
import * as tokens from "./tokens.js";
import * as stages from "./stages.js";
import * as attention from "./attention.js";
import * as embeddings from "./embeddings.js";
import * as modelView from "./model.js";

const VIEWS = ["generate", "tokens", "stages", "attention", "embeddings", "model"];
const MODEL_KEY = "attendo.model";

// --- tabs -------------------------------------------------------------------------------------

export function showView(name) {
  for (const view of VIEWS) {
    const tab = $(`tab-${view}`);
    const selected = view === name;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`view-${view}`).hidden = !selected;
  }
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  emit("view", name);
}

function wireTabs() {
  const tabs = VIEWS.map((v) => $(`tab-${v}`));
  tabs.forEach((tab, i) => {
    tab.addEventListener("click", () => showView(tab.dataset.view));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      next.focus();
      showView(next.dataset.view);
    });
  });
  on("show", showView);
  const wanted = location.hash.slice(1);
  showView(VIEWS.includes(wanted) ? wanted : "generate");
}

// --- the API key ------------------------------------------------------------------------------

let pendingKey = null;

function askForKey(wasWrong) {
  // Requests that meet a 401 together share one dialog.
  if (pendingKey) return pendingKey;
  pendingKey = new Promise((resolve) => {
    const dialog = $("key-dialog");
    $("key-error").hidden = !wasWrong;
    $("key-error").textContent = wasWrong ? "The server refused that key: check it and try again." : "";
    $("key-input").value = "";
    const done = (event) => {
      event.preventDefault();
      const key = $("key-input").value.trim();
      if (!key) return;
      storeKey(key, $("key-remember").checked);
      $("key-form").removeEventListener("submit", done);
      dialog.close();
      $("key-button").hidden = false;
      pendingKey = null;
      resolve(key);
    };
    $("key-form").addEventListener("submit", done);
    dialog.addEventListener("cancel", (event) => event.preventDefault(), { once: true });
    dialog.showModal();
    $("key-input").focus();
  });
  return pendingKey;
}

function wireKey() {
  onKeyNeeded(askForKey);
  $("key-button").hidden = storedKey() === null;
  $("key-button").addEventListener("click", () => {
    forgetKey();
    location.reload();
  });
}

// --- models -----------------------------------------------------------------------------------

async function waitForServer() {
  for (let attempt = 0; ; attempt++) {
    const response = await fetch("health").catch(() => null);
    if (response && response.ok) return;
    const body = response ? await response.json().catch(() => ({})) : {};
    if (body.status === "error") throw new Error(`The server could not load its models: ${body.message}`);
    $("model-family").textContent = "loading models…";
    await new Promise((r) => setTimeout(r, Math.min(2000, 250 * (attempt + 1))));
  }
}

async function loadModels() {
  await waitForServer();
  const list = await getJSON("v1/models");
  const described = await Promise.all(
    list.data.map(async ({ id }) => {
      try {
        const about = await getJSON(`v1/inspect/model?model=${encodeURIComponent(id)}`);
        return { id, family: about.info.family, info: about.info, path: about.path };
      } catch {
        return { id, family: null, info: null, path: null };
      }
    }),
  );
  state.models = described;
  const picker = $("model");
  picker.replaceChildren(...described.map((m) => h("option", { value: m.id }, m.family ? `${m.id} · ${m.family}` : m.id)));
  const remembered = localStorage.getItem(MODEL_KEY);
  const first = described.find((m) => m.id === remembered) || described.find((m) => generates(m)) || described[0];
  if (first) selectModel(first.id);
}

// "134,515,008" -> "135M"
function compact(count) {
  const n = Number(String(count).replaceAll(",", ""));
  if (!Number.isFinite(n)) return String(count);
  return n >= 1e9 ? `${(n / 1e9).toFixed(1)}B` : n >= 1e6 ? `${Math.round(n / 1e6)}M` : n >= 1e3 ? `${Math.round(n / 1e3)}K` : String(n);
}

function selectModel(id) {
  state.model = id;
  $("model").value = id;
  localStorage.setItem(MODEL_KEY, id);
  const model = selectedModel();
  $("model-family").textContent = model && model.info ? `${compact(model.info.parameters)} parameters` : "";
  emit("model", model);
}

function wireErrors() {
  $("error-close").addEventListener("click", clearError);
  window.addEventListener("unhandledrejection", (event) => reportError(event.reason));
}

wireErrors();
wireKey();
for (const view of [generate, tokens, stages, attention, embeddings, modelView]) view.setup();
wireTabs();
$("model").addEventListener("change", (event) => selectModel(event.target.value));
loadModels().catch(reportError);
