// The model explorer: every number and picture on the page comes from the public /v1 API, so this file
// is also an example client. No framework, no build step. The API key lives in this page's memory only.
"use strict";

const $ = (id) => document.getElementById(id);
const TRAVERSAL_DIMS = 6;                        // rows of the traversal figure
const TRAVERSAL_VALUES = [-3, -2, -1, 0, 1, 2, 3];  // z_d along each row

const page = {
  model: null,      // GET /v1/models/{name}/versions/{version}
  current: null,    // the image being analysed: {blob, url}
  a: null, b: null, // interpolation ends, like `current`
};

// ---------------------------------------------------------------- the API

class ApiError extends Error {}

function modelPath(op) {
  const m = page.model;
  return `/v1/models/${encodeURIComponent(m.name)}/versions/${encodeURIComponent(m.version)}` + (op ? `/${op}` : "");
}

// One call of the service. Errors come back as {"error": {"code", "message"}}: shown as they are.
async function api(path, {query = {}, body = null, json = null} = {}) {
  const params = new URLSearchParams();
  for (const [key, value] of Object.entries(query)) {
    if (value !== null && value !== undefined && value !== "") params.set(key, value);
  }
  const headers = {};
  const key = $("api-key").value.trim();
  if (key) headers.Authorization = `Bearer ${key}`;
  if (json !== null) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  const url = path + (params.size ? `?${params}` : "");
  const response = await fetch(url, {method: body === null ? "GET" : "POST", headers, body});
  const payload = await response.json().catch(() => null);
  if (!response.ok) {
    const error = payload && payload.error;
    const text = error ? `${response.status} ${error.code}: ${error.message}` : `${response.status} ${response.statusText}`;
    const hint = response.status === 401 ? " (type the API key above and press Connect)" : "";
    throw new ApiError(text + hint);
  }
  return payload;
}

function imagesForm(...blobs) {
  const form = new FormData();
  blobs.forEach((blob, i) => form.append("images", blob, `image${i}.png`));
  return form;
}

function labelQuery() {
  return page.model && page.model.labels ? {label: $("label").value} : {};
}

// ---------------------------------------------------------------- showing things

function showError(error) {
  const box = $("error");
  box.textContent = error instanceof ApiError ? error.message : `unexpected error: ${error.message || error}`;
  box.hidden = false;
}

function clearError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// Run an action from a button; its errors go to the error box, never to the console.
function action(fn) {
  return async (...args) => {
    clearError();
    try {
      await fn(...args);
    } catch (error) {
      showError(error);
    }
  };
}

// base64 PNG -> Blob, without fetch() (the page's CSP allows connections to the service only).
function pngBlob(base64) {
  const bytes = Uint8Array.from(atob(base64), (c) => c.charCodeAt(0));
  return new Blob([bytes], {type: "image/png"});
}

function pngImage(base64, title) {
  const img = document.createElement("img");
  img.src = `data:image/png;base64,${base64}`;
  if (title) img.title = title;
  return img;
}

// Paint a C x H x W array of floats in [0, 1] (C = 1 or 3) on a canvas, one canvas pixel per image pixel
// (CSS scales it up without smoothing).
function paintArray(canvas, array) {
  const channels = array.length, height = array[0].length, width = array[0][0].length;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const o = 4 * (y * width + x);
      for (let c = 0; c < 3; c++) {
        image.data[o + c] = Math.round(255 * Math.min(1, Math.max(0, array[channels === 1 ? 0 : c][y][x])));
      }
      image.data[o + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
}

// Squared error per pixel (mean over channels), painted black -> red -> yellow -> white, scaled to the
// largest possible error of [0, 1] pixels (1), so maps of different images compare.
function paintErrorMap(canvas, input, reconstruction) {
  const channels = input.length, height = input[0].length, width = input[0][0].length;
  canvas.width = width;
  canvas.height = height;
  const ctx = canvas.getContext("2d");
  const image = ctx.createImageData(width, height);
  let largest = 0;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      let error = 0;
      for (let c = 0; c < channels; c++) error += (input[c][y][x] - reconstruction[c][y][x]) ** 2;
      error /= channels;
      largest = Math.max(largest, error);
      const t = Math.sqrt(Math.min(1, error));  // sqrt: small errors stay visible
      const o = 4 * (y * width + x);
      image.data[o] = Math.round(255 * Math.min(1, 3 * t));
      image.data[o + 1] = Math.round(255 * Math.min(1, Math.max(0, 3 * t - 1)));
      image.data[o + 2] = Math.round(255 * Math.max(0, 3 * t - 2));
      image.data[o + 3] = 255;
    }
  }
  ctx.putImageData(image, 0, 0);
  return largest;
}

function fmt(value, digits = 2) {
  return value === null || value === undefined ? "n/a" : Number(value).toFixed(digits);
}

// ---------------------------------------------------------------- models

async function connect() {
  const {models} = await api("/v1/models");
  const select = $("model");
  const previous = select.value;
  const describe = (m) => m.latent.codebook_size
    ? `${m.name} (${m.kind}, ${m.latent.shape.join("x")} codes of ${m.latent.codebook_size})`
    : `${m.name} (${m.kind}, ${m.latent_dim} latents)`;
  select.replaceChildren(...models.map((m) => new Option(describe(m), m.name)));
  select.dataset.models = JSON.stringify(models);
  if (models.some((m) => m.name === previous)) select.value = previous;
  listVersions();
  await loadModel();
}

function listVersions() {
  const models = JSON.parse($("model").dataset.models || "[]");
  const summary = models.find((m) => m.name === $("model").value);
  if (!summary) return;
  $("version").replaceChildren(...summary.versions.map((v) => new Option(v === summary.version ? `${v} (default)` : v, v)));
  $("version").value = summary.version;
}

async function loadModel() {
  const name = $("model").value, version = $("version").value;
  const detail = await api(`/v1/models/${encodeURIComponent(name)}/versions/${encodeURIComponent(version)}`);
  page.model = detail;
  const labels = detail.labels || [];
  $("label-field").hidden = labels.length === 0;
  $("label").replaceChildren(...labels.map((l) => new Option(l, l)));
  const anomaly = detail.anomaly;
  $("method").replaceChildren(...(anomaly ? Object.keys(anomaly.methods) : []).map((m) => new Option(m, m)));
  if (anomaly) {
    $("method").value = anomaly.default_method;
    $("alpha").value = anomaly.alpha;
    $("alpha").min = anomaly.min_alpha;
  }
  $("k").max = detail.limits.max_k;
  $("k").value = Math.min(1000, detail.limits.max_k);
  const input = detail.input;
  const metric = detail.metrics && detail.metrics.test_nll ? `, test NLL ${fmt(detail.metrics.test_nll)} nats` : "";
  const latent = detail.latent.codebook_size
    ? `a ${detail.latent.shape.join("x")} grid of codes from a codebook of ${detail.latent.codebook_size}`
    : `${detail.latent_dim} latent dimensions`;
  $("model-info").textContent = `${detail.name} version ${detail.version}: ${detail.kind}, ${detail.architecture || "?"} ` +
    `architecture, ${input.channels}x${input.height}x${input.width} inputs, ${latent}, ` +
    `${detail.likelihood.family} likelihood${metric}; anomaly default ${anomaly ? anomaly.default_method : "none"}.`;
  // Gaussian latents get interpolation and traversals; a VQ-VAE's code grid gets the code editor.
  const codes = detail.family === "vqvae";
  $("codes-section").hidden = !codes;
  for (const id of ["interpolation-section", "traversal-section", "ab-buttons"]) $(id).hidden = codes;
  $("reconstruction-caption").textContent = codes ? "reconstruction E[x | z_q(x)]" : "reconstruction E[x | z = \u03bc(x)]";
  $("analysis").hidden = true;
  $("traversal").replaceChildren();
  $("interpolation").replaceChildren();
  $("code-grid").replaceChildren();
  $("code-decoded").replaceChildren();
  await sample();
  if (page.current) await analyse();
}

// ---------------------------------------------------------------- samples

async function sample() {
  const query = {n: $("sample-n").value, seed: $("seed").value, temperature: $("temperature").value};
  if (page.model.labels) query.label = $("label").value;
  const result = await api(modelPath("sample"), {query});
  const tiles = result.results.map((r, i) => {
    const img = pngImage(r.image, `sample ${i}${r.label ? `, class ${r.label}` : ""}: click to analyse`);
    img.addEventListener("click", action(() => setCurrent(pngBlob(r.image))));
    return img;
  });
  $("samples").replaceChildren(...tiles);
  $("samples").dataset.seed = result.seed;
}

// ---------------------------------------------------------------- one image

async function setCurrent(blob) {
  page.current = {blob, url: URL.createObjectURL(blob)};
  $("analyse").disabled = false;
  await analyse();
}

async function analyse() {
  const blob = page.current.blob;
  const seed = $("score-seed").value;
  const label = labelQuery();
  const [reconstruction, likelihood, anomaly] = await Promise.all([
    api(modelPath("reconstruct"), {query: {format: "array", include_input: "true", ...label}, body: imagesForm(blob)}),
    api(modelPath("log-likelihood"), {query: {k: $("k").value, seed, ...label}, body: imagesForm(blob)}),
    page.model.anomaly
      ? api(modelPath("anomaly-score"), {query: {seed, method: $("method").value, alpha: $("alpha").value, ...label},
                                          body: imagesForm(blob)})
      : Promise.resolve(null),
  ]);
  const r = reconstruction.results[0];
  paintArray($("input-view"), r.input);
  paintArray($("reconstruction"), r.array);
  const largest = paintErrorMap($("error-map"), r.input, r.array);
  $("error-caption").textContent = `squared error per pixel (mean ${fmt(r.mse, 4)}, largest ${fmt(largest, 3)})`;
  const ll = likelihood.results[0];
  const se = ll.standard_error === null ? "" : ` \u00b1 ${fmt(ll.standard_error)}`;
  $("log-likelihood").textContent = `${fmt(ll.log_likelihood)}${se} nats (k = ${ll.k}, seed ${likelihood.seed})`;
  $("elbo").textContent = `${fmt(ll.elbo)} nats`;
  $("bits-per-dim").textContent = fmt(ll.bits_per_dim, 4);
  if (anomaly) {
    const a = anomaly.results[0];
    $("anomaly-score").textContent = `${fmt(a.score, 3)} (${anomaly.method}, threshold ${fmt(a.threshold, 3)} at ` +
      `\u03b1 = ${anomaly.alpha}, k = ${anomaly.k})`;
    $("p-value").textContent = fmt(a.p_value, 4);
    $("verdict").textContent = a.is_anomaly ? "anomaly (p \u2264 \u03b1)" : "normal (p > \u03b1)";
    $("verdict").className = a.is_anomaly ? "flagged" : "normal";
  } else {
    for (const id of ["anomaly-score", "p-value", "verdict"]) $(id).textContent = "this model has no anomaly calibration";
  }
  $("analysis").hidden = false;
  if (page.model.family === "vqvae") await showCodes();
  else await traverse();
}

// ---------------------------------------------------------------- code grid (VQ-VAE)

async function showCodes() {
  const result = await api(modelPath("encode"), {body: imagesForm(page.current.blob)});
  const grid = result.results[0].codes;  // h rows of w codebook indices
  const top = page.model.latent.codebook_size - 1;
  const cells = grid.flat().map((code, i) => {
    const cell = document.createElement("input");
    Object.assign(cell, {type: "number", min: 0, max: top, step: 1, value: code,
                         title: `row ${Math.floor(i / grid[0].length)}, column ${i % grid[0].length}`});
    return cell;
  });
  $("code-grid").style.gridTemplateColumns = `repeat(${grid[0].length}, auto)`;
  $("code-grid").replaceChildren(...cells);
  $("code-grid").dataset.width = grid[0].length;
  $("code-decoded").replaceChildren();
}

async function decodeCodes() {
  const width = Number($("code-grid").dataset.width);
  const values = [...$("code-grid").querySelectorAll("input")].map((cell) => Number(cell.value));
  const grid = [];
  for (let i = 0; i < values.length; i += width) grid.push(values.slice(i, i + width));
  const result = await api(modelPath("decode"), {json: {codes: [grid]}});
  $("code-decoded").replaceChildren(pngImage(result.results[0].image, "the edited code grid, decoded"));
}

// ---------------------------------------------------------------- latent space

async function posteriorMeans(...blobs) {
  const result = await api(modelPath("encode"), {query: labelQuery(), body: imagesForm(...blobs)});
  return result.results;
}

async function decode(latents) {
  const result = await api(modelPath("decode"), {query: labelQuery(), json: {latents}});
  return result.results.map((r) => r.image);
}

// Rank the dimensions by their KL on the test set when the model's metrics have it, else by this image's
// own KL(q(z_d | x) || N(0, 1)) = (mu^2 + s^2 - 1 - log s^2) / 2.
function rankedDimensions(posterior) {
  const recorded = page.model.metrics && page.model.metrics.kl_per_dim;
  const kl = recorded || posterior.mean.map((mu, d) => (mu * mu + posterior.variance[d] - 1 - posterior.log_variance[d]) / 2);
  const order = kl.map((value, d) => [value, d]).sort((x, y) => y[0] - x[0]);
  return {order: order.slice(0, TRAVERSAL_DIMS), source: recorded ? "the test set" : "this image"};
}

async function traverse() {
  const [posterior] = await posteriorMeans(page.current.blob);
  const {order, source} = rankedDimensions(posterior);
  const latents = [];
  for (const [, d] of order) {
    for (const value of TRAVERSAL_VALUES) {
      const z = posterior.mean.slice();
      z[d] = value;
      latents.push(z);
    }
  }
  const images = await decode(latents);
  const rows = order.map(([kl, d], row) => {
    const div = document.createElement("div");
    div.className = "traversal-row";
    const name = document.createElement("span");
    name.textContent = `z${d} (KL ${fmt(kl)} nats)`;
    div.append(name, ...images.slice(row * TRAVERSAL_VALUES.length, (row + 1) * TRAVERSAL_VALUES.length)
      .map((png, i) => pngImage(png, `z${d} = ${TRAVERSAL_VALUES[i]}`)));
    return div;
  });
  $("traversal").replaceChildren(...rows);
  $("traversal-info").textContent = `The ${order.length} dimensions with the largest KL on ${source}, each moved ` +
    `from ${TRAVERSAL_VALUES[0]} to ${TRAVERSAL_VALUES.at(-1)} with the others at the posterior mean of the analysed image.`;
}

function setSlot(slot) {
  page[slot] = page.current;
  $(`slot-${slot}`).src = page.current.url;
  $("interpolate").disabled = !(page.a && page.b);
}

async function interpolate() {
  const [a, b] = await posteriorMeans(page.a.blob, page.b.blob);
  const steps = Math.max(2, Math.min(16, Number($("steps").value) || 9));
  const latents = [];
  for (let i = 0; i < steps; i++) {
    const t = i / (steps - 1);
    latents.push(a.mean.map((mu, d) => (1 - t) * mu + t * b.mean[d]));
  }
  const images = await decode(latents);
  $("interpolation").replaceChildren(...images.map((png, i) => pngImage(png, `t = ${fmt(i / (steps - 1))}`)));
}

// ---------------------------------------------------------------- drawing

function setUpDrawing() {
  const canvas = $("draw");
  const ctx = canvas.getContext("2d");
  const clear = () => {
    ctx.fillStyle = "black";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  };
  clear();
  let last = null;
  const point = (event) => {
    const box = canvas.getBoundingClientRect();
    return [(event.clientX - box.left) * canvas.width / box.width, (event.clientY - box.top) * canvas.height / box.height];
  };
  canvas.addEventListener("pointerdown", (event) => {
    last = point(event);
    canvas.setPointerCapture(event.pointerId);
  });
  canvas.addEventListener("pointermove", (event) => {
    if (!last) return;
    const next = point(event);
    ctx.strokeStyle = "white";
    ctx.lineWidth = 22;
    ctx.lineCap = "round";
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...next);
    ctx.stroke();
    last = next;
  });
  const stop = () => { last = null; };
  canvas.addEventListener("pointerup", stop);
  canvas.addEventListener("pointercancel", stop);
  $("clear-drawing").addEventListener("click", clear);
  $("use-drawing").addEventListener("click", action(async () => {
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    await setCurrent(blob);
  }));
}

// ---------------------------------------------------------------- wiring

function start() {
  setUpDrawing();
  $("connect").addEventListener("click", action(connect));
  $("model").addEventListener("change", action(async () => { listVersions(); await loadModel(); }));
  $("version").addEventListener("change", action(loadModel));
  $("label").addEventListener("change", action(async () => { await sample(); if (page.current) await analyse(); }));
  $("sample").addEventListener("click", action(sample));
  $("next-seed").addEventListener("click", action(async () => {
    $("seed").value = Number($("seed").value) + 1;
    await sample();
  }));
  $("upload").addEventListener("change", action(async () => {
    const file = $("upload").files[0];
    if (file) await setCurrent(file);
  }));
  $("analyse").addEventListener("click", action(analyse));
  $("set-a").addEventListener("click", () => setSlot("a"));
  $("set-b").addEventListener("click", () => setSlot("b"));
  $("interpolate").addEventListener("click", action(interpolate));
  $("decode-codes").addEventListener("click", action(decodeCodes));
  action(connect)();
}

start();
