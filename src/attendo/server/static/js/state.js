// What the views share: the served models, the one selected, and the generation the views
// inspect. Views announce changes with `emit` and follow them with `on`.

export const state = {
  models: [], // [{id, family, info}] from /v1/models and /v1/inspect/model
  model: null, // the selected model's id
  // The generation the Tokens, Stages and Attention views look at:
  // {model, mode, promptText, promptIds, tokens: [{id, text, logprob, top}], settings, text}
  generation: null,
  step: null, // the step (index into generation.tokens) the Stages view shows
};

const listeners = new Map();

export function on(name, listener) {
  if (!listeners.has(name)) listeners.set(name, []);
  listeners.get(name).push(listener);
}

export function emit(name, detail) {
  for (const listener of listeners.get(name) || []) listener(detail);
}

export function selectedModel() {
  return state.models.find((m) => m.id === state.model) || null;
}

// Whether the selected model generates text (decoder-only); unknown families are tried.
export function generates(model = selectedModel()) {
  return !model || !model.family || model.family === "decoder";
}
