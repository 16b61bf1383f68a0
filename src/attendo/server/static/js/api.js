// The page's only way to the server: JSON requests and server-sent event streams against the
// server's own API (paths relative to the page, so it also works behind a path prefix), with the
// API key as a Bearer token and the server's OpenAI-shaped error JSON turned into ApiError.

const KEY_NAME = "attendo.apiKey";

export class ApiError extends Error {
  constructor(message, status, code = null, param = null) {
    super(message);
    this.status = status;
    this.code = code;
    this.param = param;
  }
}

let askForKey = null; // async (previousWasWrong) => key, set by the page

export function onKeyNeeded(ask) {
  askForKey = ask;
}

export function storedKey() {
  return sessionStorage.getItem(KEY_NAME) ?? localStorage.getItem(KEY_NAME);
}

export function storeKey(key, remember) {
  sessionStorage.setItem(KEY_NAME, key);
  if (remember) localStorage.setItem(KEY_NAME, key);
}

export function forgetKey() {
  sessionStorage.removeItem(KEY_NAME);
  localStorage.removeItem(KEY_NAME);
}

function headers(json) {
  const result = json ? { "Content-Type": "application/json" } : {};
  const key = storedKey();
  if (key) result.Authorization = `Bearer ${key}`;
  return result;
}

async function errorOf(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON: a proxy's page, say
  }
  const error = body && body.error;
  if (error && typeof error.message === "string") return new ApiError(error.message, response.status, error.code, error.param);
  return new ApiError(`${response.status} ${response.statusText || "error"} from the server`, response.status);
}

// fetch, asking for the API key (once, and again only when it was wrong) on a 401.
async function send(path, options) {
  let wrong = false;
  for (;;) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: headers(options.body !== undefined) });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new ApiError(`The server did not answer (${e.message}). Is attendo serve still running?`, 0);
    }
    if (response.status !== 401 || !askForKey) return response;
    const error = await errorOf(response);
    if (error.code !== "invalid_api_key") return Promise.reject(error);
    await askForKey(wrong || storedKey() !== null);
    wrong = true;
  }
}

export async function getJSON(path, signal) {
  const response = await send(path, { method: "GET", signal });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

export async function postJSON(path, body, signal) {
  const response = await send(path, { method: "POST", body: JSON.stringify(body), signal });
  if (!response.ok) throw await errorOf(response);
  return response.json();
}

// POST with stream: true; calls onEvent(object) for each `data:` event until [DONE]. An error
// the server reports inside the stream (after it began) is thrown as ApiError too.
export async function postStream(path, body, onEvent, signal) {
  const response = await send(path, { method: "POST", body: JSON.stringify(body), signal });
  if (!response.ok) throw await errorOf(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      const object = JSON.parse(data);
      if (object.error) throw new ApiError(object.error.message, 500, object.error.code);
      onEvent(object);
    }
  }
}
