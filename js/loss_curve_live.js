// Klein LoRA Lab: the Loss Curve node follows a run live. The node's picture is drawn by the server when the node
// runs, so during a new run it would keep showing the previous chart until the run ends; this DOM widget draws
// the run's loss as it trains instead (raw loss, the node's smoothing, validation loss, checkpoint marks).
//
// It follows the run named in the node's `run` widget (a run name, or a run folder's path ending in that name):
// the history route GET /klein_lab/train/history?run=NAME gives the points so far (on load, a page reload or the
// first event of a new run), then the pack's `klein_lab.train.*` events add the new ones. The live chart shows
// while that run trains and after it ends until the node runs again (then the server's fresh picture is current).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { el, injectStyle } from "./dom.js";
import { ema } from "./train_panel.js";

export const CURVE_EXTENSION_NAME = "KleinLoraLab.lossCurveLive";
export const CURVE_NODE_CLASS = "KleinLabLossCurve";
const WIDGET_NAME = "klein_loss_live";
const EVENTS = ["step", "phase", "checkpoint", "done"].map((e) => `klein_lab.train.${e}`);
const CHART_HEIGHT_PX = 190;

const STYLE = `
.klein-curve { display: flex; flex-direction: column; gap: 3px; box-sizing: border-box; width: 100%; padding: 2px 4px;
  color: var(--input-text, #ddd); font: 11px sans-serif; }
.klein-curve[hidden] { display: none !important; }
.klein-curve canvas { width: 100%; height: ${CHART_HEIGHT_PX}px; display: block; background: #16181c; border-radius: 3px; }
`;

/** The run name a `run` widget value names: the name itself, or the last part of a run folder's path. */
export function runNameOf(value) {
  return String(value ?? "")
    .trim()
    .replace(/[\\/]+$/, "")
    .split(/[\\/]/)
    .pop();
}

class LiveCurve {
  constructor(node) {
    this.node = node;
    this.points = new Map(); // step -> [loss, val_loss|null]
    this.checkpoints = [];
    this.total = 0;
    this.step = 0;
    this.phase = "";
    this.status = "";
    this.following = ""; // the run shown; "" = hidden (the node's own picture is current)
    this.loading = null;
    injectStyle("klein-curve-style", STYLE);
    this.statusEl = el("div", { "data-testid": "klein-curve-status" });
    this.canvas = el("canvas", { "data-testid": "klein-curve-chart" });
    this.root = el("div", { class: "klein-curve", "data-testid": "klein-curve", hidden: true }, [
      this.statusEl,
      this.canvas,
    ]);
    this.resize = new ResizeObserver(() => this.draw());
    this.resize.observe(this.root);
  }

  runName() {
    return runNameOf(this.node.widgets?.find((w) => w.name === "run")?.value);
  }

  smoothing() {
    const value = Number(this.node.widgets?.find((w) => w.name === "smoothing")?.value);
    return Number.isFinite(value) ? value : 0.9;
  }

  /** Read the run's history; follow it when it trains now (or `force`: an event of it just arrived). */
  async load(force = false) {
    const run = this.runName();
    if (!run) return;
    const loading = (async () => {
      const resp = await api.fetchApi(`/klein_lab/train/history?run=${encodeURIComponent(run)}`);
      if (!resp.ok) return;
      const data = await resp.json();
      if (run !== this.runName()) return;
      this.points = new Map((data.points ?? []).map(([step, loss, val]) => [step, [loss, val]]));
      this.checkpoints = (data.checkpoints ?? []).map((c) => c.step);
      this.total = data.live?.total ?? data.total ?? 0;
      this.step = data.live?.step ?? [...this.points.keys()].at(-1) ?? 0;
      this.phase = data.live?.phase ?? "";
      this.status = data.live ? "running" : data.status ?? "";
      if (data.live || force) this.follow(run);
    })();
    this.loading = loading;
    try {
      await loading;
    } finally {
      if (this.loading === loading) this.loading = null;
    }
  }

  follow(run) {
    this.following = run;
    this.show(true);
  }

  show(visible) {
    if (this.root.hidden === !visible) return this.render();
    this.root.hidden = !visible;
    this.node.setSize?.([this.node.size[0], Math.max(this.node.computeSize?.()[1] ?? 0, this.node.size[1])]);
    this.node.setDirtyCanvas?.(true, true);
    this.render();
  }

  async onEvent(type, d) {
    if (!d?.run || d.run !== this.runName()) return;
    if (this.following !== d.run || this.loading) {
      // A new run (or the page missed its start): the history brings the points up to now.
      if (!this.loading) await this.load(true);
      else await this.loading;
      if (this.following !== d.run) this.follow(d.run);
      if (type === "step") this.addPoints(d); // points sent after the history was read are not lost
      this.render();
      return;
    }
    if (type === "step") this.addPoints(d);
    else if (type === "phase") this.phase = d.phase;
    else if (type === "checkpoint" && !this.checkpoints.includes(d.step)) this.checkpoints.push(d.step);
    else if (type === "done") {
      this.status = d.status;
      this.phase = "";
    }
    this.render();
  }

  addPoints(d) {
    for (const [step, loss, val] of d.points ?? []) this.points.set(step, [loss, val]);
    this.total = d.total ?? this.total;
    this.step = d.step ?? this.step;
    this.phase = d.phase ?? this.phase;
    this.status = "running";
  }

  /** The node ran: its own picture is the current chart again. */
  onExecuted() {
    this.following = "";
    this.show(false);
  }

  render() {
    const last = [...this.points.values()].at(-1)?.[0];
    const live = this.status === "running";
    this.statusEl.textContent =
      `${live ? "live" : this.status || "—"} · ${this.following} · step ${this.step}/${this.total}` +
      (last != null ? ` · loss ${last.toFixed(4)}` : "") +
      (live && this.phase ? ` · ${this.phase}` : "") +
      (live ? "" : " · queue the node to redraw its picture");
    this.root.dataset.points = String(this.points.size);
    this.root.dataset.status = this.status;
    this.root.dataset.step = String(this.step);
    this.root.dataset.run = this.following;
    this.draw();
  }

  draw() {
    if (this.root.hidden) return;
    const canvas = this.canvas;
    const dpr = window.devicePixelRatio || 1;
    const width = Math.max(100, canvas.clientWidth);
    const height = CHART_HEIGHT_PX;
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, width, height);
    const f = { left: 44, right: width - 8, top: 8, bottom: height - 18 };
    const steps = [...this.points.keys()].sort((a, b) => a - b);
    const losses = steps.map((k) => this.points.get(k)[0]);
    const vals = steps.filter((k) => this.points.get(k)[1] != null).map((k) => [k, this.points.get(k)[1]]);
    const ys = [...losses, ...vals.map((v) => v[1])].filter(Number.isFinite);
    let [lo, hi] = ys.length ? [Math.min(...ys), Math.max(...ys)] : [0, 1];
    if (hi === lo) [lo, hi] = [lo - 0.5, hi + 0.5];
    const x0 = steps[0] ?? 0; // the steps so far fill the width (the status line says how far the run goes)
    const x1 = Math.max(steps.at(-1) ?? 1, x0 + 1);
    const px = (x) => f.left + ((x - x0) / (x1 - x0)) * (f.right - f.left);
    const py = (v) => f.bottom - ((v - lo) / (hi - lo)) * (f.bottom - f.top);
    ctx.strokeStyle = "#444";
    ctx.strokeRect(f.left, f.top, f.right - f.left, f.bottom - f.top);
    ctx.fillStyle = "#aaa";
    ctx.font = "10px sans-serif";
    ctx.fillText(hi.toPrecision(3), 2, f.top + 8);
    ctx.fillText(lo.toPrecision(3), 2, f.bottom);
    ctx.fillText(String(x0), f.left, height - 4);
    ctx.fillText(String(x1), f.right - 24, height - 4);
    ctx.strokeStyle = "#4ae28c";
    for (const step of this.checkpoints) {
      ctx.beginPath();
      ctx.moveTo(px(step), f.bottom);
      ctx.lineTo(px(step), f.bottom - 8);
      ctx.stroke();
    }
    const line = (pts, colour, widthPx) => {
      if (!pts.length) return;
      ctx.strokeStyle = colour;
      ctx.lineWidth = widthPx;
      ctx.beginPath();
      pts.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
      ctx.stroke();
      ctx.lineWidth = 1;
    };
    line(steps.map((k, i) => [px(k), py(losses[i])]), "#6c7a89", 1);
    const smooth = ema(losses, this.smoothing());
    line(steps.map((k, i) => [px(k), py(smooth[i])]), "#e8e8e8", 2);
    ctx.fillStyle = "#ffaa3c";
    for (const [k, v] of vals) ctx.fillRect(px(k) - 2, py(v) - 2, 4, 4);
    canvas.dataset.points = String(steps.length);
  }

  destroy() {
    this.resize.disconnect();
  }
}

const curves = new Set();

function attachCurve(node) {
  if (node.kleinCurve) return node.kleinCurve;
  const curve = new LiveCurve(node);
  node.kleinCurve = curve;
  curves.add(curve);
  const widget = node.addDOMWidget(WIDGET_NAME, "klein_loss_live", curve.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => (curve.root.hidden ? 0 : CHART_HEIGHT_PX + 36),
    getMaxHeight: () => (curve.root.hidden ? 0 : CHART_HEIGHT_PX + 36),
  });
  widget.serialize = false;
  node.setSize?.([Math.max(node.size?.[0] ?? 0, 420), node.size?.[1] ?? 0]);
  const onExecuted = node.onExecuted;
  node.onExecuted = function () {
    const result = onExecuted?.apply(this, arguments);
    curve.onExecuted();
    return result;
  };
  const onConfigure = node.onConfigure;
  node.onConfigure = function () {
    const result = onConfigure?.apply(this, arguments);
    curve.load(); // a loaded workflow's run name arrives here: follow it if it trains now
    return result;
  };
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    curves.delete(curve);
    curve.destroy();
    return onRemoved?.apply(this, arguments);
  };
  setTimeout(() => curve.load(), 0);
  return curve;
}

// ComfyUI may load this module twice (see js/klein_lora_lab.js): register once.
if (!(app.extensions ?? []).some((ext) => ext.name === CURVE_EXTENSION_NAME)) {
  for (const event of EVENTS) {
    const type = event.split(".").pop();
    api.addEventListener(event, ({ detail }) => {
      for (const curve of curves) curve.onEvent(type, detail);
    });
  }
  api.addEventListener("reconnected", () => {
    for (const curve of curves) curve.load();
  });
  app.registerExtension({
    name: CURVE_EXTENSION_NAME,
    nodeCreated(node) {
      const comfyClass = node.comfyClass ?? node.constructor?.comfyClass;
      if (comfyClass === CURVE_NODE_CLASS) attachCurve(node);
    },
  });
}
