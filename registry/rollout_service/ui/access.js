// The decisions a person makes from the dashboard: approve or reject a promotion that waits for approval, and
// accept, reject or decommission a device's key. Each is one POST to the rollout service with the page's operator
// token; the service checks the token's scope (operate for rollouts, admin for devices) and the page shows its
// refusal as it is. dashboard.js passes its escaping `html` template tag in (`kit`), as for analysis.js.

// Which buttons a row gets: [action, label, needs a confirmation]. The paths are built from these names only.
const ROLLOUT_ACTIONS = [["approve", "Approve", false], ["reject", "Reject", true]];
const KEY_ACTIONS = [["accept", "Accept", true], ["reject", "Reject", false]];
const RETIRE = ["decommission", "Decommission", true];

/** Approve / Reject for a rollout that waits for approval; nothing otherwise. */
export function approvalButtons(rollout, kit) {
  if (rollout.state !== "waiting_for_approval") return "";
  return buttons(kit, "rollout", rollout.id, ROLLOUT_ACTIONS);
}

/** A device's standing, with the buttons for the decision it waits for (or Decommission, for an accepted one). */
export function standingCell(device, kit) {
  const { html } = kit;
  const waitsForKey = Boolean(device.key_change_requested_at);
  const status = device.status ?? "accepted";
  const note = waitsForKey
    ? html`<div class="muted">another key asks for this id since ${kit.stamp(device.key_change_requested_at)}</div>`
    : "";
  const actions = status === "pending" || waitsForKey ? KEY_ACTIONS : status === "accepted" ? [RETIRE] : [];
  return html`<span class="badge tone-${TONES[status] ?? "quiet"}">${status}</span>${note}
    ${buttons(kit, "device", device.device_id, actions)}`;
}

const TONES = { accepted: "good", pending: "warn", rejected: "bad", decommissioned: "quiet" };

function buttons(kit, kind, id, actions) {
  const { html } = kit;
  return html`<span class="decisions">${actions.map(
    ([action, text, confirm]) => html`<button type="button" class="decide" data-kind="${kind}" data-id="${id}"
      data-action="${action}" data-confirm="${confirm ? "yes" : ""}">${text}</button>`,
  )}</span>`;
}

/** The request a clicked decision button stands for, or null when the click was not on one. */
export function decisionOf(target) {
  const button = target.closest("button.decide");
  if (!button) return null;
  const { kind, id, action } = button.dataset;
  const base = kind === "rollout" ? "v1/rollouts" : "v1/devices";
  const what = kind === "rollout" ? `rollout ${id}` : `device ${id}`;
  return { path: `${base}/${encodeURIComponent(id)}/${action}`, what, action, confirm: button.dataset.confirm === "yes" };
}

/** Send one decision; resolves to the service's answer, or throws an Error with the service's reason. */
export async function decide(root, decision, token) {
  const answer = await fetch(new URL(decision.path, root), {
    method: "POST",
    headers: { Authorization: `Bearer ${token}`, "Content-Type": "application/json" },
    body: JSON.stringify(decision.path.startsWith("v1/rollouts") ? { reason: "from the dashboard" } : {}),
    cache: "no-store",
  });
  const body = await answer.json().catch(() => ({}));
  if (!answer.ok) throw new Error(`${decision.action} ${decision.what}: ${answer.status} ${body.detail ?? answer.statusText}`);
  return body;
}
