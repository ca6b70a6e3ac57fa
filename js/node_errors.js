// Errors where the artist looks: when a node of this pack fails, the pack's own message (it names the bad value and
// the fix) is shown on the failing node and as the first line of a toast, instead of only inside the stack-trace
// report two clicks away. Every node of the pack is recognised by its class name (KleinLab...), so this needs no
// knowledge of the error's type; the message is ComfyUI's `execution_error.exception_message` as the pack raised it.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { injectStyle } from "./dom.js";

export const ERRORS_EXTENSION_NAME = "KleinLoraLab.nodeErrors";
export const PACK_NODE_PREFIX = "KleinLab";
const WIDGET_NAME = "klein_error";
const TOAST_LIFE_MS = 20000;

const STYLE = `
.klein-node-error { box-sizing: border-box; width: 100%; padding: 4px 6px; border-radius: 4px;
  background: rgba(200, 40, 40, 0.22); border-left: 3px solid #e04848; color: var(--input-text, #eee);
  font: 12px sans-serif; white-space: pre-wrap; overflow-wrap: anywhere; max-height: 160px; overflow: auto; }
.klein-node-error b { display: block; margin-bottom: 2px; }
`;


/** The message's first sentence-line (the toast's summary) and the whole text. */
export function splitMessage(message) {
  const text = String(message ?? "").trim();
  const first = text.split("\n")[0];
  return { first: first.length > 200 ? `${first.slice(0, 197)}...` : first, text };
}

function findNode(id) {
  const graph = app.graph;
  return graph?.getNodeById?.(id) ?? graph?.getNodeById?.(Number(id)) ?? null;
}

function errorBox(node) {
  if (node.kleinError) return node.kleinError;
  injectStyle("klein-node-error-style", STYLE);
  const box = document.createElement("div");
  box.className = "klein-node-error";
  box.dataset.testid = "klein-node-error";
  box.hidden = true;
  node.addDOMWidget(WIDGET_NAME, "klein_error", box, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => (box.hidden ? 0 : 64),
  });
  const widget = node.widgets?.find((w) => w.name === WIDGET_NAME);
  if (widget) widget.serialize = false;
  node.kleinError = box;
  return box;
}

function showError(node, message, type) {
  const box = errorBox(node);
  const { first, text } = splitMessage(message);
  const head = document.createElement("b");
  head.textContent = `Failed: ${first}`;
  const rest = document.createElement("span");
  rest.textContent = text === first ? "" : text.slice(first.length).trim();
  box.replaceChildren(head, rest);
  box.dataset.errorType = type ?? "";
  box.hidden = false;
  const size = node.computeSize?.();
  if (size && node.size && size[1] > node.size[1]) node.setSize?.([node.size[0], size[1]]);
  node.setDirtyCanvas?.(true, true);
}

function clearErrors() {
  for (const node of app.graph?.nodes ?? []) {
    if (node.kleinError && !node.kleinError.hidden) {
      node.kleinError.hidden = true;
      node.kleinError.replaceChildren();
    }
  }
}

if (!(app.extensions ?? []).some((ext) => ext.name === ERRORS_EXTENSION_NAME)) {
  api.addEventListener("execution_error", ({ detail }) => {
    if (!String(detail?.node_type ?? "").startsWith(PACK_NODE_PREFIX)) return;
    const node = findNode(detail.node_id);
    const { first, text } = splitMessage(detail.exception_message);
    window.kleinLastError = { node: String(detail.node_id), type: detail.node_type, message: text };
    if (node) showError(node, text, detail.exception_type);
    const title = node?.title ?? detail.node_type;
    app.extensionManager?.toast?.add?.({ severity: "error", summary: `${title}: ${first}`, detail: text, life: TOAST_LIFE_MS });
  });
  api.addEventListener("execution_start", clearErrors);
  app.registerExtension({ name: ERRORS_EXTENSION_NAME });
}
