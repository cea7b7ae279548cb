// The fleet dashboard. It reads the rollout service's /v1 REST API with an operator token and redraws itself
// every few seconds. No build step and no dependencies: every value reaches the page through the escaping `html`
// template tag, and the charts are SVG drawn below. The fleet analysis view is in analysis.js, the decisions a person
// makes here (approvals, device keys) in access.js.

import { approvalButtons, decide, decisionOf, standingCell } from "./access.js";
import { analysisBadge, analysisSection } from "./analysis.js";

const REFRESH_MS = 3000;
const TOKEN_KEY = "yolo-ota.operator-token";
const ROLLOUTS_SHOWN = 10;
const WINDOWS_PER_ARM = 200;
// One colour per arm everywhere on the page (a colour-blind-safe pair).
const ARM_COLOURS = { treatment: "#d95f02", control: "#1f78b4" };
// The service root wherever the page is mounted: the page is <root>/ui/, this file <root>/ui/dashboard.js.
const API_ROOT = new URL("../", import.meta.url);

const view = { token: null, chosenAb: null, lastGood: null, timer: 0, run: 0, refreshes: 0 };

// -- HTML that escapes what it is given ---------------------------------------------------------------------------

class Html {
  constructor(text) {
    this.text = text;
  }
}

const ESCAPES = { "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" };

function escapeText(value) {
  return String(value).replace(/[&<>"']/g, (c) => ESCAPES[c]);
}

function fragment(value) {
  if (value instanceof Html) return value.text;
  if (Array.isArray(value)) return value.map(fragment).join("");
  if (value === null || value === undefined || value === false) return "";
  return escapeText(value);
}

/** Template tag: interpolated values are escaped, unless they were made by `html` themselves. */
function html(strings, ...values) {
  return new Html(strings.reduce((out, text, i) => out + fragment(values[i - 1]) + text));
}

function $(selector) {
  return document.querySelector(selector);
}

function put(selector, content) {
  $(selector).innerHTML = content.text;
}

// -- formatting ---------------------------------------------------------------------------------------------------

function number(value, digits = 0) {
  return value === null || value === undefined ? "–" : value.toFixed(digits);
}

function percent(fraction, digits = 1) {
  return fraction === null || fraction === undefined ? "–" : `${(fraction * 100).toFixed(digits)} %`;
}

function pad(n) {
  return String(n).padStart(2, "0");
}

function clock(date) {
  return `${pad(date.getHours())}:${pad(date.getMinutes())}:${pad(date.getSeconds())}`;
}

function stamp(iso) {
  const date = new Date(iso);
  return `${date.getFullYear()}-${pad(date.getMonth() + 1)}-${pad(date.getDate())} ${clock(date)}`;
}

function ago(iso, now) {
  if (!iso) return "never";
  const s = Math.max(0, Math.round((now - new Date(iso)) / 1000));
  if (s < 60) return `${s} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  if (s < 86400) return `${Math.floor(s / 3600)} h ago`;
  return `${Math.floor(s / 86400)} d ago`;
}

// Tones of the state badges; the class name comes from this table, never from the data.
const TONES = {
  committed: "good", completed: "good", passed: "good", running: "info", baking: "info",
  downloading: "info", verifying: "info", validating: "info", swapping: "info", probation: "info",
  pending: "quiet", waiting: "quiet", idle: "quiet", enrolled: "quiet", waiting_for_approval: "warn",
  rejected: "bad",
  paused: "warn", halted: "bad", aborted: "warn", stopped: "warn",
  rolling_back: "bad", rolled_back: "bad", failed: "bad",
};

function badge(state) {
  return html`<span class="badge tone-${TONES[state] ?? "quiet"}">${state.replaceAll("_", " ")}</span>`;
}

// -- the REST API -------------------------------------------------------------------------------------------------

class Unauthorized extends Error {}
class Unreachable extends Error {}

async function api(path, token) {
  let answer;
  try {
    answer = await fetch(new URL(path, API_ROOT), {
      headers: { Authorization: `Bearer ${token}` },
      cache: "no-store",
    });
  } catch (error) {
    throw new Unreachable(error.message);
  }
  const body = await answer.json().catch(() => ({}));
  if (answer.status === 401) throw new Unauthorized(body.detail ?? "401 Unauthorized");
  if (!answer.ok) throw new Error(`GET /${path}: ${answer.status} ${body.detail ?? answer.statusText}`);
  return body;
}

/** Everything one redraw shows: devices, the newest rollouts with their progress, one A/B test's telemetry. */
async function loadSnapshot(token, chosenAb) {
  const get = (path) => api(path, token);
  const [fleet, list] = await Promise.all([get("v1/devices?limit=1000"), get(`v1/rollouts?limit=${ROLLOUTS_SHOWN}`)]);
  const rollouts = await Promise.all(list.rollouts.map((r) => get(`v1/rollouts/${r.id}`)));
  const ab = rollouts.find((r) => r.id === chosenAb) ?? rollouts.find((r) => r.strategy === "ab") ?? null;
  const telemetry = ab ? await get(`v1/rollouts/${ab.id}/telemetry?limit=${WINDOWS_PER_ARM}`) : null;
  return { devices: fleet.devices, totalDevices: fleet.total, rollouts, ab, telemetry, at: new Date() };
}

// -- devices ------------------------------------------------------------------------------------------------------

function devicesTable(devices, now) {
  if (!devices.length) {
    return html`<p class="empty">No device has enrolled yet. A device appears here once its agent
      (<code>yolo-ota agent</code>) enrolls.</p>`;
  }
  return html`<table class="grid">
    <thead><tr><th>Device</th><th>Standing</th><th>Labels</th><th>Running</th><th>State</th><th>Last seen</th>
      <th>torch</th><th>Runs on</th><th>GPU</th></tr></thead>
    <tbody>${devices.map((device) => deviceRow(device, now))}</tbody>
  </table>`;
}

function deviceRow(device, now) {
  const fp = device.fingerprint ?? {};
  const version = device.current_version;
  return html`<tr data-device="${device.device_id}" data-version="${version ?? ""}">
    <td class="id">${device.device_id}</td>
    <td class="standing">${standingCell(device, KIT)}</td>
    <td>${labelChips(device.labels)}</td>
    <td>${running(device)}</td>
    <td>${badge(device.state ?? "enrolled")}</td>
    <td title="${device.last_seen_at ? stamp(device.last_seen_at) : ""}">${ago(device.last_seen_at, now)}</td>
    <td>${fp.torch ?? "?"}</td>
    <td title="torch built for ${fp.cuda_runtime ? `CUDA ${fp.cuda_runtime}` : "cpu only"}">${runsOn(fp)}</td>
    <td>${gpu(fp)}</td>
  </tr>`;
}

function running(device) {
  if (!device.current_version) return html`<span class="muted">nothing yet</span>`;
  return html`${device.model ?? ""} <b class="version">v${device.current_version}</b>`;
}

function labelChips(labels) {
  const entries = Object.entries(labels ?? {});
  if (!entries.length) return html`<span class="muted">none</span>`;
  return entries.map(([key, value]) => html`<span class="chip">${key}=${value}</span> `);
}

function runsOn(fp) {
  return fp.cuda_runtime && fp.gpu_name ? `CUDA ${fp.cuda_runtime}` : "cpu";
}

function gpu(fp) {
  if (!fp.gpu_name) return html`<span class="muted">none</span>`;
  const memory = fp.gpu_memory_bytes ? ` · ${(fp.gpu_memory_bytes / 2 ** 30).toFixed(0)} GiB` : "";
  const capability = fp.gpu_capability ? ` (sm ${fp.gpu_capability})` : "";
  return `${fp.gpu_name}${capability}${memory}`;
}

// -- rollouts -----------------------------------------------------------------------------------------------------

function rolloutsTable(rollouts, shownAb) {
  if (!rollouts.length) {
    return html`<p class="empty">No rollout yet. Moving the <code>production</code> alias in MLflow starts one, as
      does <code>yolo-ota rollout create</code>.</p>`;
  }
  return html`<table class="grid rollouts">
    <thead><tr><th>#</th><th>Model</th><th>Version</th><th>Strategy</th><th>State</th><th>Progress</th>
      <th>Devices</th><th>Created</th></tr></thead>
    <tbody>${rollouts.map((rollout) => rolloutRow(rollout, rollout.id === shownAb))}</tbody>
  </table>`;
}

function rolloutRow(rollout, shown) {
  return html`<tr data-rollout="${rollout.id}" data-state="${rollout.state}" class="${shown ? "shown" : ""}">
    <td class="id">${rollout.id}</td>
    <td>${rollout.model}</td>
    <td>${versions(rollout)}</td>
    <td>${rollout.strategy}${rollout.strategy === "ab" ? abButton(rollout, shown) : ""}</td>
    <td>${badge(rollout.state)}${currentWave(rollout)}${analysisBadge(rollout, KIT)}${approvalButtons(rollout, KIT)}</td>
    <td class="progress">${progress(rollout)}</td>
    <td>${targeting(rollout)}</td>
    <td>${stamp(rollout.created_at)}<div class="muted">${rollout.created_by}</div></td>
  </tr>`;
}

function progress(rollout) {
  if (rollout.strategy === "ab") return rollout.arms.map(armProgress);
  return rollout.wave_progress.map((wave) => waveProgress(wave, rollout));
}

function versions(rollout) {
  if (rollout.ab) {
    return html`<b class="version">v${rollout.version}</b> vs v${rollout.ab.control_version}
      <div class="muted">${percent(rollout.ab.split, 0)} get v${rollout.version}</div>`;
  }
  const from = rollout.previous_version ? html`<div class="muted">from v${rollout.previous_version}</div>` : "";
  return html`<b class="version">v${rollout.version}</b>${from}`;
}

function abButton(rollout, shown) {
  return shown
    ? html`<div class="muted">charts below</div>`
    : html`<div><button type="button" class="link" data-show-ab="${rollout.id}">show charts</button></div>`;
}

function currentWave(rollout) {
  if (rollout.strategy === "ab" || rollout.waves.length < 2) return "";
  return html`<div class="muted">wave ${rollout.current_wave + 1} of ${rollout.waves.length}</div>`;
}

function waveProgress(wave, rollout) {
  const current = wave.index === rollout.current_wave;
  return progressLine({
    name: `W${wave.index + 1} · ${wave.percent} %`,
    counts: wave,
    extra: wave.state,
    attributes: html`data-wave="${wave.index}" data-current="${String(current)}"`,
    current,
  });
}

function armProgress(arm) {
  return progressLine({
    name: `${arm.arm} v${arm.version ?? "?"}`,
    counts: { ...arm, pending: arm.devices - arm.succeeded - arm.failed },
    extra: "",
    attributes: html`data-arm="${arm.arm}"`,
    current: false,
  });
}

function progressLine({ name, counts, extra, attributes, current }) {
  const { devices, succeeded, failed, pending } = counts;
  return html`<div class="wave${current ? " current" : ""}" ${attributes} data-devices="${devices}"
      data-succeeded="${succeeded}" data-failed="${failed}" data-pending="${pending}">
    <span class="wave-name">${name}</span>
    ${stackedBar(succeeded, failed, pending)}
    <span class="counts"><b class="ok">${succeeded}</b> ok · <b class="${failed ? "bad" : ""}">${failed}</b> failed ·
      ${pending} pending <span class="muted">of ${devices}${extra ? ` · ${extra}` : ""}</span></span>
  </div>`;
}

function stackedBar(succeeded, failed, pending) {
  const width = 120;
  const total = succeeded + failed + pending;
  let x = 0;
  const parts = [["ok", succeeded], ["bad", failed], ["pending", pending]].map(([kind, count]) => {
    const w = total ? (width * count) / total : 0;
    const rect = html`<rect class="seg-${kind}" x="${x.toFixed(1)}" y="0" width="${w.toFixed(1)}" height="10"/>`;
    x += w;
    return rect;
  });
  return html`<svg class="stack" viewBox="0 0 ${width} 10" width="${width}" height="10" aria-hidden="true">
    <rect class="seg-track" x="0" y="0" width="${width}" height="10"/>${parts}</svg>`;
}

function targeting(rollout) {
  const skipped = rollout.skipped_incompatible;
  const reasons = Object.entries(rollout.incompatible_reasons ?? {}).map(([why, n]) => `${n}: ${why}`).join("\n");
  const skippedLine = html`<div class="bad" title="${reasons}">${skipped} skipped (cannot run it)</div>`;
  return html`${rollout.targeted} targeted${skipped ? skippedLine : ""}`;
}

// -- the A/B test -------------------------------------------------------------------------------------------------

function abSection(rollout, telemetry) {
  if (!rollout) {
    return html`<p class="empty">No A/B test among the newest rollouts. Start one with
      <code>yolo-ota rollout create --control-version N …</code> (strategy <code>ab</code>).</p>`;
  }
  const windows = Object.fromEntries((telemetry?.arms ?? []).map((arm) => [arm.arm, arm]));
  const arms = rollout.arms.map((arm) => ({ ...arm, windows: windows[arm.arm]?.windows ?? [] }));
  return html`<p class="ab-title" data-rollout="${rollout.id}">Rollout <b>#${rollout.id}</b> of ${rollout.model}:
      treatment <b>v${rollout.version}</b> vs control <b>v${rollout.ab?.control_version}</b>,
      ${percent(rollout.ab?.split, 0)} on treatment ${badge(rollout.state)}</p>
    ${armsTable(arms)}
    <div class="charts">${abCharts(arms)}</div>`;
}

function abCharts(arms) {
  return [
    latencyChart(arms),
    barChart({
      key: "error-rate",
      title: "Error rate",
      axis: "errors per inference (%)",
      arms,
      value: (arm) => (arm.error_rate === null ? null : arm.error_rate * 100),
      format: (v) => `${v.toFixed(2)} %`,
      note: "Every error each arm reported, over every inference it reported.",
    }),
    barChart({
      key: "detections",
      title: "Detections per image",
      axis: "detections per image (mean)",
      arms,
      value: (arm) => arm.detections_per_image,
      format: (v) => v.toFixed(2),
      note: "Mean over each arm's report windows, weighted by their inferences.",
    }),
  ];
}

function armsTable(arms) {
  return html`<table class="grid arms">
    <thead><tr><th>Arm</th><th>Version</th><th>Devices</th><th>Succeeded</th><th>Failed</th><th>Windows</th>
      <th>Inferences</th><th>Errors</th><th>Error rate</th><th>p50 (median)</th><th>p99 (99th pct)</th>
      <th>Detections / image</th><th>Confidence</th></tr></thead>
    <tbody>${arms.map(armRow)}</tbody>
  </table>`;
}

function armRow(arm) {
  return html`<tr data-arm="${arm.arm}">
    <td>${swatch(arm.arm)} ${arm.arm}</td><td>v${arm.version ?? "?"}</td><td>${arm.devices}</td>
    <td>${arm.succeeded}</td><td>${arm.failed}</td><td>${arm.reports}</td><td>${arm.inferences}</td>
    <td>${arm.errors}</td><td>${percent(arm.error_rate, 2)}</td><td>${number(arm.latency_p50_ms, 1)} ms</td>
    <td>${number(arm.latency_p99_ms, 1)} ms</td><td>${number(arm.detections_per_image, 2)}</td>
    <td>${number(arm.mean_confidence, 3)}</td>
  </tr>`;
}

function swatch(arm) {
  return html`<svg class="swatch" viewBox="0 0 10 10" width="10" height="10" aria-hidden="true">
    <rect width="10" height="10" rx="2" fill="${ARM_COLOURS[arm] ?? "#888"}"/></svg>`;
}

function legend(arms) {
  const entries = arms.map((arm) => html`<span>${swatch(arm.arm)} ${arm.arm} v${arm.version ?? "?"}</span>`);
  return html`<span class="legend">${entries}</span>`;
}

// -- charts -------------------------------------------------------------------------------------------------------

const CHART = { width: 440, left: 104, right: 18, top: 10, axisHeight: 44 };

/** A 0-based axis whose top and step are round numbers, at most about five steps. */
function niceAxis(maxValue) {
  const target = maxValue > 0 ? maxValue : 1;
  const raw = target / 5;
  const power = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * power).find((s) => s >= raw);
  const top = Math.ceil(target / step - 1e-9) * step;
  const ticks = [];
  for (let i = 0; i * step <= top + step / 2; i += 1) ticks.push(i * step);
  return { top, ticks, x: (v) => CHART.left + ((CHART.width - CHART.left - CHART.right) * v) / top };
}

function tickText(value) {
  return Number.isInteger(value) ? String(value) : value.toFixed(value < 1 ? 2 : 1).replace(/0+$/, "");
}

function label(x, y, text, { cls = "tick", anchor = "start" } = {}) {
  return html`<text class="${cls}" x="${x}" y="${y}" text-anchor="${anchor}">${text}</text>`;
}

function xAxis(axis, plotBottom, title) {
  const right = CHART.width - CHART.right;
  const ticks = axis.ticks.map((t) => html`
    <line class="grid-line" x1="${axis.x(t)}" x2="${axis.x(t)}" y1="${CHART.top}" y2="${plotBottom}"/>
    ${label(axis.x(t), plotBottom + 15, tickText(t), { anchor: "middle" })}`);
  return html`${ticks}<line class="axis" x1="${CHART.left}" x2="${right}" y1="${plotBottom}" y2="${plotBottom}"/>
    ${label((CHART.left + right) / 2, plotBottom + 36, title, { cls: "axis-label", anchor: "middle" })}`;
}

function rowLabel(y, text) {
  return label(CHART.left - 8, y + 4, text, { cls: "row-label", anchor: "end" });
}

function chartFigure({ key, title, arms, height, body, note }) {
  return html`<figure class="chart" data-chart="${key}">
    <figcaption><b>${title}</b>${legend(arms)}</figcaption>
    <svg class="plot" viewBox="0 0 ${CHART.width} ${height}" role="img" aria-label="${title}">${body}</svg>
    <p class="note">${note}</p>
  </figure>`;
}

function median(values) {
  const sorted = [...values].sort((a, b) => a - b);
  const mid = Math.floor(sorted.length / 2);
  return sorted.length % 2 ? sorted[mid] : (sorted[mid - 1] + sorted[mid]) / 2;
}

/** Strip chart: one dot per telemetry window, a row for p50 and one for p99 per arm, a bar at each median. */
function latencyChart(arms) {
  const rows = arms.flatMap((arm) =>
    ["p50", "p99"].map((metric) => ({ arm, metric, values: arm.windows.map((w) => w[`${metric}_ms`]) })));
  const rowHeight = 34;
  const plotBottom = CHART.top + rows.length * rowHeight;
  const axis = niceAxis(Math.max(0, ...rows.flatMap((row) => row.values)));
  const body = rows.map((row, i) => stripRow(row, axis, CHART.top + i * rowHeight + rowHeight / 2));
  const reported = arms.some((arm) => arm.windows.length);
  return chartFigure({
    key: "latency",
    title: "Latency per window",
    arms,
    height: plotBottom + CHART.axisHeight,
    body: html`${xAxis(axis, plotBottom, "latency (ms)")}${body}`,
    note: reported
      ? `Each dot is one device's report window (newest ${WINDOWS_PER_ARM} per arm); the bar is the median.`
      : "No telemetry windows reported yet.",
  });
}

function stripRow({ arm, metric, values }, axis, y) {
  const colour = ARM_COLOURS[arm.arm] ?? "#888";
  const opacity = metric === "p50" ? 0.55 : 0.25;
  // A fixed vertical spread per dot (not random), so that redraws do not make the dots dance.
  const dots = values.map((v, i) => html`<circle class="window" data-arm="${arm.arm}" data-metric="${metric}"
      data-value="${v}" cx="${axis.x(v).toFixed(1)}" cy="${(y + (((i * 7) % 11) - 5) * 1.6).toFixed(1)}" r="4"
      fill="${colour}" fill-opacity="${opacity}" stroke="${colour}"/>`);
  if (!values.length) return html`${rowLabel(y, `${arm.arm} ${metric}`)}${label(CHART.left + 6, y + 4, "no windows")}`;
  const mid = median(values);
  const marker = html`<line class="median" data-arm="${arm.arm}" data-metric="${metric}" data-value="${mid}"
      x1="${axis.x(mid)}" x2="${axis.x(mid)}" y1="${y - 13}" y2="${y + 13}"/>`;
  return html`${rowLabel(y, `${arm.arm} ${metric}`)}${dots}${marker}`;
}

/** One horizontal bar per arm with its value written at the end. */
function barChart({ key, title, axis: axisTitle, arms, value, format, note }) {
  const rowHeight = 40;
  const plotBottom = CHART.top + arms.length * rowHeight;
  const values = arms.map(value);
  const axis = niceAxis(Math.max(0, ...values.filter((v) => v !== null)));
  const bars = arms.map((arm, i) => bar(arm, values[i], axis, CHART.top + i * rowHeight + rowHeight / 2, format));
  return chartFigure({
    key,
    title,
    arms,
    height: plotBottom + CHART.axisHeight,
    body: html`${xAxis(axis, plotBottom, axisTitle)}${bars}`,
    note,
  });
}

function bar(arm, value, axis, y, format) {
  const name = rowLabel(y, `${arm.arm} v${arm.version ?? "?"}`);
  if (value === null) return html`${name}${label(CHART.left + 6, y + 4, "no data")}`;
  const end = axis.x(value);
  return html`${name}<rect class="bar" data-arm="${arm.arm}" data-value="${value}" x="${CHART.left}" y="${y - 11}"
      width="${Math.max(1, end - CHART.left).toFixed(1)}" height="22" rx="2" fill="${ARM_COLOURS[arm.arm] ?? "#888"}"/>
    ${label(end + 5, y + 4, format(value), { cls: "value" })}`;
}

// -- the fleet analysis (analysis.js) ----------------------------------------------------------------------------

const KIT = { html, stamp, colours: ARM_COLOURS };

/** The newest of the shown rollouts that has a stored verdict. */
function analysed(rollouts) {
  return rollouts.find((rollout) => rollout.analysis) ?? null;
}

// -- the page -----------------------------------------------------------------------------------------------------

function render(snapshot) {
  put("#devices-body", devicesTable(snapshot.devices, snapshot.at));
  put("#rollouts-body", rolloutsTable(snapshot.rollouts, snapshot.ab?.id));
  put("#ab-body", abSection(snapshot.ab, snapshot.telemetry));
  put("#analysis-body", analysisSection(analysed(snapshot.rollouts), KIT));
  $("#devices-title").textContent = `Devices (${snapshot.totalDevices})`;
  const shown = snapshot.rollouts.length;
  $("#rollouts-title").textContent = shown < ROLLOUTS_SHOWN ? `Rollouts (${shown})` : `Rollouts (newest ${shown})`;
  $("#dashboard").hidden = false;
  $("#forget-token").hidden = false;
  $("#status").textContent = `Updated ${clock(snapshot.at)} · refreshes every ${REFRESH_MS / 1000} s`;
  $("#status").classList.remove("stale");
}

function showBanner(message) {
  $("#banner").textContent = message;
  $("#banner").hidden = !message;
}

function setState(state) {
  document.body.dataset.state = state;
}

function showProblem(error) {
  const since = view.lastGood ? `Showing what it said at ${clock(view.lastGood.at)}` : "Nothing to show yet";
  const retry = `trying again every ${REFRESH_MS / 1000} s`;
  if (error instanceof Unreachable) {
    showBanner(`Cannot reach the rollout service at ${API_ROOT.origin} (${error.message}). ${since}; ${retry}.`);
    setState("unreachable");
  } else {
    showBanner(`The rollout service answered with an error: ${error.message}. ${since}; ${retry}.`);
    setState("error");
  }
  $("#status").textContent = view.lastGood ? `Last updated ${clock(view.lastGood.at)} · not current` : "No data yet";
  $("#status").classList.add("stale");
}

function askForToken(message = "") {
  view.token = null;
  view.lastGood = null;
  clearTimeout(view.timer);
  for (const body of ["#devices-body", "#rollouts-body", "#ab-body", "#analysis-body"]) $(body).textContent = "";
  $("#dashboard").hidden = true;
  $("#forget-token").hidden = true;
  $("#token-form").hidden = false;
  $("#status").textContent = "No operator token";
  showBanner(message);
  setState(message ? "unauthorized" : "needs-token");
  $("#token-input").focus();
}

async function refresh() {
  clearTimeout(view.timer);
  if (!view.token) return askForToken();
  const run = ++view.run;
  try {
    const snapshot = await loadSnapshot(view.token, view.chosenAb);
    if (run !== view.run) return; // a newer refresh started meanwhile (a click); it draws instead
    view.lastGood = snapshot;
    render(snapshot);
    showBanner("");
    setState("ready");
    document.body.dataset.refreshes = String(++view.refreshes);
  } catch (error) {
    if (run !== view.run) return;
    if (error instanceof Unauthorized) {
      sessionStorage.removeItem(TOKEN_KEY);
      return askForToken(`The rollout service refused this token (401: ${error.message}). Paste an operator token.`);
    }
    showProblem(error);
  }
  if (!document.hidden) view.timer = setTimeout(refresh, REFRESH_MS); // nobody looks: no polling until they do
}

// -- events -------------------------------------------------------------------------------------------------------

function tokenFromFragment() {
  const token = new URLSearchParams(window.location.hash.slice(1)).get("token");
  if (!token) return null;
  sessionStorage.setItem(TOKEN_KEY, token);
  // Out of the address bar and the history, so that it is not shared along with a link or a screenshot.
  history.replaceState(null, "", window.location.pathname + window.location.search);
  return token;
}

function onTokenSubmit(event) {
  event.preventDefault();
  const token = $("#token-input").value.trim();
  if (!token) return;
  sessionStorage.setItem(TOKEN_KEY, token);
  $("#token-input").value = "";
  $("#token-form").hidden = true;
  showBanner("");
  view.token = token;
  refresh();
}

function onForgetToken() {
  sessionStorage.removeItem(TOKEN_KEY);
  askForToken();
}

async function onDecisionClick(event) {
  const decision = decisionOf(event.target);
  if (!decision || !view.token) return;
  if (decision.confirm && !window.confirm(`${decision.action} ${decision.what}?`)) return;
  try {
    await decide(API_ROOT, decision, view.token);
    showBanner("");
  } catch (error) {
    showBanner(`The rollout service refused: ${error.message}`);
    setState("refused");
    return;
  }
  refresh();
}

function onRolloutsClick(event) {
  const button = event.target.closest("[data-show-ab]");
  if (!button) return;
  view.chosenAb = Number(button.dataset.showAb);
  refresh();
}

function onVisibilityChange() {
  if (document.hidden) clearTimeout(view.timer);
  else if (view.token) refresh();
}

function start() {
  $("#token-form").addEventListener("submit", onTokenSubmit);
  $("#forget-token").addEventListener("click", onForgetToken);
  $("#rollouts-body").addEventListener("click", onRolloutsClick);
  $("#rollouts-body").addEventListener("click", onDecisionClick);
  $("#devices-body").addEventListener("click", onDecisionClick);
  document.addEventListener("visibilitychange", onVisibilityChange);
  view.token = tokenFromFragment() ?? sessionStorage.getItem(TOKEN_KEY);
  refresh();
}

start();
