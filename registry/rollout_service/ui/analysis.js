// The fleet analysis of one rollout: its latest verdict and every metric's figures, as GET /v1/rollouts/{id}
// carries them (`analysis`, the newest stored verdict; docs/analysis.md). dashboard.js passes its escaping `html`
// template tag and helpers in, so that every value reaches the page escaped here too.

// Tones of the verdicts; the class name comes from this table, never from the data.
const VERDICT_TONES = { pass: "good", marginal: "warn", fail: "bad", inconclusive: "quiet" };
const ACTIONS = {
  wait: "waits for more data",
  advance: "moved to the next wave",
  complete: "completed the rollout",
  halt: "halted the rollout",
  rollback: "rolled the wave back",
  pause: "paused the rollout for a person to decide",
};
const HIST = { width: 150, height: 16, gap: 1 };

/** The analysis view: `kit` is { html, stamp, colours } from dashboard.js. */
export function analysisSection(rollout, kit) {
  const { html } = kit;
  if (!rollout) {
    return html`<p class="empty">No rollout among the newest has a fleet analysis yet. A canary with a previous
      version, or an A/B test, is judged once its arms report telemetry (<code>analysis</code> block of
      <code>POST /v1/rollouts</code>).</p>`;
  }
  const a = rollout.analysis;
  return html`<p class="analysis-title" data-rollout="${rollout.id}">Rollout <b>#${rollout.id}</b> of
      ${rollout.model}: treatment <b>v${a.treatment_version}</b> vs control <b>v${a.control_version ?? "?"}</b>
      · ${a.kind === "ab" ? "A/B test" : `canary wave ${a.wave + 1}`} · judged ${kit.stamp(a.at)}</p>
    ${summary(a, kit)}
    <p class="analysis-reason" data-verdict="${a.verdict}">${a.reason}</p>
    ${metricsTable(a, kit)}`;
}

/** A short verdict line for the rollouts table. */
export function analysisBadge(rollout, kit) {
  const a = rollout.analysis;
  if (!a) return "";
  const score = a.score === null ? "" : ` ${a.score.toFixed(0)}`;
  return kit.html`<div class="muted" data-analysis="${a.verdict}">analysis ${verdictBadge(a.verdict, kit)}${score}
    </div>`;
}

function verdictBadge(verdict, { html }) {
  return html`<span class="badge verdict tone-${VERDICT_TONES[verdict] ?? "quiet"}">${verdict}</span>`;
}

function summary(a, kit) {
  const { html } = kit;
  const winner = a.kind === "ab"
    ? html`<div data-field="winner"><dt>Winner</dt>
      <dd>${a.winner ? `${a.winner} v${armVersion(a, a.winner)}` : "none yet"}</dd></div>`
    : "";
  return html`<dl class="verdict-summary">
    <div data-field="verdict"><dt>Verdict</dt><dd>${verdictBadge(a.verdict, kit)}</dd></div>
    <div data-field="score"><dt>Score</dt><dd>${a.score === null ? "–" : `${a.score.toFixed(1)} / 100`}</dd></div>
    <div data-field="action"><dt>Action</dt><dd title="${ACTIONS[a.action] ?? ""}">${a.action}</dd></div>
    ${winner}
    <div data-field="windows"><dt>Windows</dt><dd>${swatchText("treatment", a.treatment_windows, kit)}
      ${swatchText("control", a.control_windows, kit)}</dd></div>
  </dl>`;
}

function armVersion(a, arm) {
  return arm === "treatment" ? a.treatment_version : a.control_version ?? "?";
}

function swatchText(arm, count, { html, colours }) {
  // A fill attribute, not a style: the page's CSP allows no inline styles.
  return html`<span class="arm-count" data-arm="${arm}" data-windows="${count}"><svg class="swatch" viewBox="0 0 10 10"
      width="10" height="10" aria-hidden="true"><rect width="10" height="10" rx="2" fill="${colours[arm]}"/></svg>
    ${arm} ${count}</span>`;
}

function metricsTable(a, kit) {
  const { html } = kit;
  // A class neither arm detected says nothing: one line for all of them instead of a row each.
  const unseen = a.metrics.filter((m) => m.family === "class_rate" && !m.treatment && !m.control);
  const shown = a.metrics.filter((m) => !unseen.includes(m));
  const better = a.kind === "ab" ? html`<th>Better</th>` : "";
  const note = unseen.length
    ? html`<p class="note">${unseen.length} class${unseen.length === 1 ? "" : "es"} seen in neither arm not listed.</p>`
    : "";
  return html`<table class="grid metrics">
    <thead><tr><th>Metric</th><th>Verdict</th><th>Treatment</th><th>Control</th><th>Effect</th><th>Band</th>
      <th>p-value</th>${better}<th>Distributions <span class="muted">(treatment over control)</span></th></tr></thead>
    <tbody>${shown.map((m) => metricRow(m, a.kind, kit))}</tbody>
  </table>${note}`;
}

function metricRow(m, kind, kit) {
  const { html } = kit;
  const critical = m.critical ? html` <span class="critical" title="a fail fails the analysis">critical</span>` : "";
  const better = kind === "ab" ? html`<td data-field="better">${m.better ?? "–"}</td>` : "";
  return html`<tr data-metric="${m.name}" data-verdict="${m.verdict}" title="${m.reason}">
    <td class="id">${m.name}${critical}</td>
    <td>${verdictBadge(m.verdict, kit)}</td>
    <td data-field="treatment">${figure(m, m.treatment)}</td>
    <td data-field="control">${figure(m, m.control)}</td>
    <td data-field="effect" class="${m.verdict === "fail" ? "bad" : ""}">${signedPercent(m.effect)}</td>
    <td data-field="band">${band(m)}</td>
    <td data-field="p-value">${pValue(m.p_value)}</td>
    ${better}
    <td class="hists">${histograms(m, kit)}</td>
  </tr>`;
}

/** A metric's figure in its unit: ms, a rate per inference, a rate per image, a mean confidence. */
function figure(m, value) {
  if (value === null || value === undefined) return "–";
  if (m.family === "latency_p99") return `${value.toFixed(1)} ms`;
  if (m.family === "error_rate" || m.family === "nan_rate") return `${(value * 100).toFixed(2)} %`;
  if (m.family === "confidence") return value.toFixed(3);
  return `${value.toFixed(3)} / image`;
}

function signedPercent(fraction) {
  if (fraction === null || fraction === undefined) return "–";
  const value = fraction * 100;
  return `${value > 0 ? "+" : ""}${value.toFixed(Math.abs(value) < 10 ? 1 : 0)} %`;
}

function band(m) {
  if (m.family === "confidence") return "PSI";
  if (m.family === "nan_rate") return "none";
  if (m.band === null || m.band === undefined) return "–";
  if (m.family === "error_rate") return `+${(m.band * 100).toFixed(2)} pp`;
  const sign = m.direction === "both" ? "±" : m.direction === "increase" ? "+" : "−";
  return `${sign}${(m.band * 100).toFixed(0)} %`;
}

function pValue(p) {
  if (p === null || p === undefined) return "–";
  return p < 0.001 ? p.toExponential(1) : p.toFixed(3);
}

/** The two arms' normalised distributions as two rows of bars on one scale, treatment above control. */
function histograms(m, kit) {
  const { html } = kit;
  if (!m.treatment_hist || !m.control_hist) return html`<span class="muted">no data</span>`;
  const top = Math.max(1e-9, ...m.treatment_hist, ...m.control_hist);
  const rows = [["treatment", m.treatment_hist, 0], ["control", m.control_hist, HIST.height + 3]];
  const height = 2 * HIST.height + 3;
  return html`<svg class="hist" viewBox="0 0 ${HIST.width} ${height}" width="${HIST.width}" height="${height}"
      role="img" aria-label="${m.name}: treatment and control distributions">
    ${rows.map(([arm, values, y]) => histRow(arm, values, y, top, kit))}</svg>`;
}

function histRow(arm, values, y, top, { html, colours }) {
  const step = HIST.width / values.length;
  const bars = values.map((v, i) => {
    const h = Math.max(v > 0 ? 1 : 0, (HIST.height * v) / top);
    return html`<rect data-arm="${arm}" data-value="${v}" x="${(i * step).toFixed(1)}"
      y="${(y + HIST.height - h).toFixed(1)}" width="${Math.max(1, step - HIST.gap).toFixed(1)}"
      height="${h.toFixed(1)}" fill="${colours[arm]}"/>`;
  });
  const base = y + HIST.height;
  return html`<line class="hist-base" x1="0" x2="${HIST.width}" y1="${base}" y2="${base}"/>${bars}`;
}
