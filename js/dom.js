// Small DOM helpers shared by the pack's widgets (scrubber, training panel, node errors). ComfyUI loads every .js
// file of this folder as a module; this one registers nothing.
import { api } from "../../scripts/api.js";

/** Add a <style id=...> with `css` to the page once (every widget of one kind shares it). */
export function injectStyle(id, css) {
  if (document.getElementById(id)) return;
  const style = document.createElement("style");
  style.id = id;
  style.textContent = css;
  document.head.appendChild(style);
}

/** An element with properties (or attributes, for strings) and children. */
export function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "dataset") Object.assign(node.dataset, value);
    else if (key in node && typeof value !== "string") node[key] = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

/** URL of an image ref {filename, subfolder, type} as ComfyUI serves it. */
export function viewURL(ref) {
  if (!ref?.filename) return "";
  const query = new URLSearchParams({ filename: ref.filename, subfolder: ref.subfolder ?? "", type: ref.type ?? "output" });
  return api.apiURL(`/view?${query}`);
}
