// Klein LoRA Lab training panel: a DOM widget on KleinLabTrainLora (and KleinLabSweep, where it follows the run of
// the sweep that trains and says which: "run 2 of 3: learning_rate 5e-05") that shows the run live and lets the
// artist stop it at the sweet spot ("sampling during training beats watching loss alone").
//
// - a loss chart (loss, smoothed loss, validation loss, checkpoint marks; hover readout; linear/log scale) and,
//   on the same step axis, the live clinic (concept strength, prompt flexibility, the bicycle test, trigger-free
//   drift) with the sweet-spot mark;
// - a gallery of the validation previews, prompts x steps, newest first, labelled; click to enlarge; A/B of two
//   steps side by side;
// - status (step/total, it/s, ETA, peak VRAM, phase, last checkpoint; 'encoding i/N' while the Encode Dataset node
//   upstream encodes the album) and the buttons Stop & keep, Sample now and,
//   after a stop, Resume.
// Live data come from the server's `klein_lab.train.*` events; the history (a reload, a second tab, the last run of
// this node) from GET /klein_lab/train/history?run=NAME, which reads the run folder. Images are files served by
// ComfyUI's /view. The same file fills rank/alpha/learning_rate/steps with the chosen preset's values.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { el, injectStyle, viewURL } from "./dom.js";

export const PANEL_EXTENSION_NAME = "KleinLoraLab.trainPanel";
export const PANEL_NODE_CLASS = "KleinLabTrainLora";
export const SWEEP_NODE_CLASS = "KleinLabSweep";
const WIDGET_NAME = "klein_train_panel";
const EVENTS = ["step", "phase", "checkpoint", "sample", "clinic", "done"].map((e) => `klein_lab.train.${e}`);
const PRESET_WIDGETS = ["rank", "alpha", "learning_rate", "steps"];
const MIN_HEIGHT_PX = 620;
const EMA_DECAY = 0.9; // the Loss Curve node's smoothing
const STOPPED = new Set(["stopped", "cancelled", "sweet_spot", "interrupted"]);
const CLINIC_SERIES = [
  ["concept", "concept strength", "#6ebeff"],
  ["flexibility", "flexibility", "#78c878"],
  ["memorisation", "bicycle test", "#f06e6e"],
  ["trigger_free_drift", "trigger-free drift", "#c88cff"],
];
const THRESHOLDS = [
  [0.5, "#f06e6e"],
  [0.3, "#c88cff"],
  [0.1, "#6ebeff"],
];

const STYLE = `
.klein-panel { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; width: 100%; height: 100%;
  min-height: ${MIN_HEIGHT_PX}px; padding: 4px; color: var(--input-text, #ddd); font: 12px sans-serif; }
.klein-panel [hidden] { display: none !important; }
.klein-panel-sweep { font-weight: bold; color: #ffd250; }
.klein-panel-status { display: flex; flex-wrap: wrap; gap: 2px 10px; }
.klein-panel-status b { font-weight: bold; }
.klein-panel-message { white-space: pre-wrap; background: rgba(255,255,255,0.06); padding: 3px 5px;
  border-radius: 3px; max-height: 84px; overflow: auto; }
.klein-panel-mark { white-space: pre-wrap; background: rgba(255,210,80,0.18); border-left: 3px solid #ffd250;
  padding: 3px 5px; }
.klein-panel-buttons { display: flex; gap: 4px; flex-wrap: wrap; align-items: center; }
.klein-panel-buttons button { font-size: 11px; padding: 2px 8px; cursor: pointer; }
.klein-panel-buttons button[aria-pressed=true] { outline: 1px solid var(--p-primary-color, #4a90e2); }
.klein-panel-chart { position: relative; flex: 0 0 auto; }
.klein-panel-chart canvas { width: 100%; display: block; background: #16181c; border-radius: 3px; }
.klein-panel-hover { position: absolute; top: 2px; right: 4px; background: rgba(0,0,0,0.7); padding: 1px 4px;
  border-radius: 3px; pointer-events: none; white-space: nowrap; }
.klein-panel-legend { display: flex; flex-wrap: wrap; gap: 2px 10px; font-size: 11px; opacity: 0.85; }
.klein-panel-legend i { display: inline-block; width: 10px; height: 3px; margin-right: 3px; vertical-align: middle; }
.klein-panel-gallery { flex: 1 1 auto; min-height: 120px; overflow: auto; display: flex; flex-direction: column;
  gap: 4px; }
.klein-panel-row { display: flex; gap: 4px; align-items: flex-start; }
.klein-panel-row.is-mark .klein-panel-step { color: #ffd250; }
.klein-panel-step { flex: 0 0 64px; display: flex; flex-direction: column; gap: 2px; font-weight: bold; }
.klein-panel-step button { font-size: 10px; padding: 0 4px; cursor: pointer; }
.klein-panel-step button[aria-pressed=true] { background: var(--p-primary-color, #4a90e2); color: #fff; }
.klein-panel-cell { flex: 0 0 92px; width: 92px; cursor: zoom-in; }
.klein-panel-cell img { width: 92px; height: 92px; object-fit: contain; background: #111; display: block; }
.klein-panel-cell span { display: block; font-size: 10px; overflow: hidden; text-overflow: ellipsis;
  white-space: nowrap; opacity: 0.85; }
.klein-panel-big { position: absolute; inset: 0; background: rgba(0,0,0,0.88); display: flex;
  flex-direction: column; align-items: center; justify-content: center; gap: 4px; cursor: zoom-out; z-index: 5; }
.klein-panel-big .klein-panel-pair { display: flex; gap: 6px; width: 96%; height: 86%; }
.klein-panel-big figure { margin: 0; flex: 1 1 0; display: flex; flex-direction: column; min-width: 0; }
.klein-panel-big img { flex: 1 1 auto; min-height: 0; width: 100%; object-fit: contain; }
.klein-panel-big figcaption { text-align: center; padding: 2px; }
.klein-panel-empty { opacity: 0.7; padding: 6px; }
`;


export function formatEta(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "?";
  const s = Math.round(seconds);
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const sec = String(s % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${sec}` : `${m}:${sec}`;
}

/** Exponential moving average, as the Loss Curve node draws it. */
export function ema(values, decay = EMA_DECAY) {
  const out = [];
  let avg = null;
  for (const v of values) {
    avg = avg === null ? v : decay * avg + (1 - decay) * v;
    out.push(avg);
  }
  return out;
}

function fmt(v) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "—";
  return Math.abs(v) >= 0.01 || v === 0 ? v.toFixed(4) : v.toExponential(2);
}

/** The run's state as the panel draws it; filled from the history route and then from events. */
function emptyState(run) {
  return {
    run,
    exists: false,
    total: 0,
    points: new Map(), // step -> [loss, val_loss|null]
    checkpoints: [],
    samples: new Map(), // step -> [{prompt, text, image}]
    clinic: new Map(), // step -> record
    mark: null,
    status: "",
    message: "",
    live: null, // {step, total, rate, eta, peak_vram, phase, last_checkpoint}
    sweep: null, // {name, index, total, knob, value, text} while a run of a sweep trains
  };
}

class TrainPanel {
  constructor(node) {
    this.node = node;
    this.sweepNode = (node.comfyClass ?? node.constructor?.comfyClass) === SWEEP_NODE_CLASS;
    this.state = emptyState("");
    this.scale = "linear";
    this.ab = { a: null, b: null };
    this.hoverStep = null;
    this.drawPending = false;
    this.loading = null;
    this.encoding = null; // {done, total} of the Encode Dataset node feeding this one, until the run reports
    this.build();
  }

  // --- DOM ------------------------------------------------------------------------------------------------
  build() {
    injectStyle("klein-panel-style", STYLE);
    const t = (id) => ({ "data-testid": id });
    this.sweepEl = el("div", { class: "klein-panel-sweep", ...t("klein-panel-sweep"), hidden: true });
    this.statusEl = el("div", { class: "klein-panel-status", ...t("klein-panel-status") });
    this.messageEl = el("div", { class: "klein-panel-message", ...t("klein-panel-message"), hidden: true });
    this.markEl = el("div", { class: "klein-panel-mark", ...t("klein-panel-mark"), hidden: true });
    this.stopBtn = this.button("Stop & keep", "klein-panel-stop", () => this.control("stop"));
    this.sampleBtn = this.button("Sample now", "klein-panel-sample", () => this.control("sample"));
    this.resumeBtn = this.button("Resume", "klein-panel-resume", () => this.resume());
    this.scaleBtn = this.button("log scale", "klein-panel-scale", () => {
      this.scale = this.scale === "linear" ? "log" : "linear";
      this.scaleBtn.ariaPressed = String(this.scale === "log");
      this.requestDraw();
    });
    this.lossCanvas = el("canvas", { dataset: { h: "150" }, ...t("klein-panel-chart") });
    this.clinicCanvas = el("canvas", { dataset: { h: "110" }, ...t("klein-panel-clinic") });
    this.hoverEl = el("div", { class: "klein-panel-hover", ...t("klein-panel-hover"), hidden: true });
    const legend = (items) =>
      el(
        "div",
        { class: "klein-panel-legend" },
        items.map(([label, colour]) => el("span", {}, [el("i", { style: `background:${colour}` }), label])),
      );
    this.gallery = el("div", { class: "klein-panel-gallery", ...t("klein-panel-gallery") });
    this.big = el("div", { class: "klein-panel-big", ...t("klein-panel-big"), hidden: true });
    this.big.addEventListener("click", () => (this.big.hidden = true));
    this.root = el("div", { class: "klein-panel", ...t("klein-panel"), style: "position: relative" }, [
      this.sweepEl,
      this.statusEl,
      this.messageEl,
      this.markEl,
      el("div", { class: "klein-panel-buttons" }, [this.stopBtn, this.sampleBtn, this.resumeBtn, this.scaleBtn]),
      el("div", { class: "klein-panel-chart" }, [this.lossCanvas, this.hoverEl]),
      legend([
        ["loss", "#6c7a89"],
        ["smoothed", "#e8e8e8"],
        ["validation", "#ffaa3c"],
        ["checkpoint", "#4ae28c"],
        ["sweet spot", "#ffd250"],
      ]),
      el("div", { class: "klein-panel-chart" }, [this.clinicCanvas]),
      legend(CLINIC_SERIES.map(([, label, colour]) => [label, colour])),
      this.gallery,
      this.big,
    ]);
    for (const canvas of [this.lossCanvas, this.clinicCanvas]) {
      canvas.addEventListener("pointermove", (e) => this.onHover(e, canvas));
      canvas.addEventListener("pointerleave", () => {
        this.hoverStep = null;
        this.hoverEl.hidden = true;
        this.requestDraw();
      });
    }
    for (const type of ["pointerdown", "pointermove", "pointerup", "wheel"]) {
      this.root.addEventListener(type, (event) => event.stopPropagation());
    }
    this.resize = new ResizeObserver(() => this.requestDraw());
    this.resize.observe(this.root);
    this.render();
  }

  button(text, testid, onClick) {
    const button = el("button", { type: "button", "data-testid": testid }, [text]);
    button.addEventListener("click", onClick);
    return button;
  }

  widget(name) {
    return this.node.widgets?.find((w) => w.name === name);
  }

  runName() {
    return String(this.widget("run_name")?.value ?? "").trim();
  }

  // --- data -----------------------------------------------------------------------------------------------
  /**
   * Read the run's history from its folder (a reload, a second tab, a new run name). A Sweep node has no run name:
   * it asks for the run it trains now, if any.
   */
  async load(run = this.runName()) {
    const query = run ? { run } : this.sweepNode ? { node: String(this.node.id) } : null;
    if (!query) return;
    const token = {};
    this.loading = token;
    let data;
    try {
      const resp = await api.fetchApi(`/klein_lab/train/history?${new URLSearchParams(query)}`);
      data = await resp.json();
      if (!resp.ok) throw new Error(data.error ?? `HTTP ${resp.status}`);
    } catch (err) {
      if (this.loading === token) {
        this.state = emptyState(run);
        this.state.message = `Cannot read run '${run}': ${err.message}`;
        this.render();
      }
      return;
    }
    if (this.loading !== token) return;
    this.loading = null;
    const s = emptyState(data.run ?? run);
    s.exists = data.exists;
    s.total = data.total ?? 0;
    for (const [step, loss, val] of data.points ?? []) s.points.set(step, [loss, val]);
    s.checkpoints = data.checkpoints ?? [];
    for (const sample of data.samples ?? []) this.addSample(s, sample.step, sample);
    for (const record of data.clinic ?? []) s.clinic.set(record.step, record);
    s.mark = data.mark ?? null;
    s.status = data.status ?? "";
    s.live = data.live ?? null;
    s.sweep = data.live?.sweep ?? null;
    this.state = s;
    this.render();
  }

  addSample(state, step, entry) {
    const list = state.samples.get(step) ?? [];
    list[entry.prompt] = entry;
    state.samples.set(step, list);
  }

  /** A live event for this node's run; events of another run are ignored (a new run reloads the history). */
  /** Whether node `id` feeds this Train node (an Encode Dataset upstream of it). */
  feedsFrom(id) {
    const seen = new Set();
    const queue = [this.node];
    while (queue.length) {
      const node = queue.pop();
      for (let i = 0; i < (node.inputs?.length ?? 0); i++) {
        const source = node.getInputNode?.(i);
        if (!source || seen.has(source.id)) continue;
        if (String(source.id) === id) return true;
        seen.add(source.id);
        queue.push(source);
      }
    }
    return false;
  }

  onEvent(type, d) {
    if (type === "phase" && d.phase === "encoding" && !d.run) {
      // The Encode Dataset node's progress (it runs before the run exists): shown by the Train nodes it feeds.
      if (d.node == null || !this.feedsFrom(String(d.node))) return;
      this.encoding = { done: d.done, total: d.total };
      this.render(false);
      return;
    }
    const mine = d.run === this.runName() || (d.node != null && String(d.node) === String(this.node.id));
    if (!mine) return;
    this.encoding = null; // the run itself reports from here on
    if (d.run !== this.state.run) {
      this.load(d.run); // the history brings everything up to now; the live events continue from there
      return;
    }
    const s = this.state;
    s.exists = true;
    s.live ??= { step: 0, total: s.total, phase: "training" };
    if (d.sweep) s.sweep = d.sweep;
    if (type === "step") {
      const first = d.points[0]?.[0];
      if (first !== undefined) for (const step of [...s.points.keys()]) if (step >= first) s.points.delete(step);
      for (const [step, loss, val] of d.points) s.points.set(step, [loss, val]);
      Object.assign(s.live, { step: d.step, total: d.total, rate: d.rate, eta: d.eta, peak_vram: d.peak_vram, phase: d.phase });
      s.total = d.total;
      s.status = "running";
      s.message = "";
    } else if (type === "phase") {
      s.live.phase = d.phase;
      s.status = "running";
    } else if (type === "checkpoint") {
      s.checkpoints = s.checkpoints.filter((c) => c.step !== d.step).concat([{ step: d.step, lora: d.lora }]);
      s.live.last_checkpoint = d.lora;
    } else if (type === "sample") {
      for (const entry of d.images) this.addSample(s, d.step, entry);
    } else if (type === "clinic") {
      s.clinic.set(d.record.step, d.record);
      s.mark = d.mark;
    } else if (type === "done") {
      s.status = d.status;
      s.message = d.message;
      s.live = null;
    }
    this.render(type !== "step" && type !== "phase");
  }

  async control(action) {
    const run = this.state.run || this.runName();
    const resp = await api.fetchApi(`/klein_lab/train/${action}`, {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ run, node: String(this.node.id) }),
    });
    if (!resp.ok) {
      const data = await resp.json().catch(() => ({}));
      this.state.message = data.error ?? `HTTP ${resp.status}`;
    } else if (action === "stop") {
      this.state.message = "Stopping after the current step; the run is kept.";
    } else {
      this.state.message = "Previews at the next step.";
    }
    this.render();
  }

  /** Resume: turn resume on and queue the workflow as the Run button does (a sweep queued again continues). */
  async resume() {
    const widget = this.widget("resume");
    if (widget) {
      widget.value = true;
      widget.callback?.(true);
    }
    this.state.message = widget ? "Queued with resume on." : "Queued again: the sweep continues where it stopped.";
    this.render();
    const command = app.extensionManager?.command;
    if (command?.execute) await command.execute("Comfy.QueuePrompt");
    else await app.queuePrompt(0, 1);
  }

  // --- rendering ------------------------------------------------------------------------------------------
  render(rebuildGallery = true) {
    const s = this.state;
    const live = s.live;
    const last = s.checkpoints.at(-1)?.lora ?? "";
    const parts = [];
    if (this.encoding && !live) {
      parts.push(["run", s.run || this.runName() || "—"]);
      parts.push(["phase", `encoding ${this.encoding.done}/${this.encoding.total}`]);
    } else if (live) {
      parts.push(["step", `${live.step}/${live.total ?? s.total}`]);
      parts.push(["it/s", live.rate ? live.rate.toFixed(2) : "—"]);
      parts.push(["ETA", formatEta(live.eta)]);
      parts.push(["peak VRAM", live.peak_vram == null ? "— (CPU)" : `${live.peak_vram} GiB`]);
      parts.push(["phase", live.phase ?? ""]);
    } else if (s.exists) {
      const step = [...s.points.keys()].at(-1) ?? 0;
      parts.push(["run", s.run]);
      parts.push(["step", `${step}/${s.total}`]);
      parts.push(["status", s.status || "—"]);
    } else {
      parts.push(["run", s.run || this.runName() || "—"]);
      parts.push(["status", "not started: queue the workflow"]);
    }
    if (last || live?.last_checkpoint) parts.push(["last checkpoint", (live?.last_checkpoint || last).split("/").pop()]);
    this.statusEl.replaceChildren(
      ...parts.map(([k, v]) => el("span", { dataset: { key: k } }, [`${k} `, el("b", {}, [String(v)])])),
    );
    this.sweepEl.hidden = !s.sweep;
    this.sweepEl.textContent = s.sweep?.text ?? "";
    this.sweepEl.dataset.index = String(s.sweep?.index ?? "");
    this.messageEl.hidden = !s.message;
    this.messageEl.textContent = s.message;
    const mark = s.mark;
    this.markEl.hidden = !mark;
    if (mark) {
      const keep = this.keepCheckpoint(mark.keep_step);
      this.markEl.textContent = `Sweet spot marked at step ${mark.step}: ${mark.reason}.\nKeep: ${keep}`;
      this.markEl.dataset.step = String(mark.step);
      this.markEl.dataset.rule = mark.rule;
    }
    this.stopBtn.disabled = !live;
    this.sampleBtn.disabled = !live;
    this.resumeBtn.hidden = !!live || !STOPPED.has(s.status);
    this.root.dataset.points = String(s.points.size);
    this.root.dataset.status = live ? "running" : s.status;
    this.root.dataset.phase = this.encoding && !live ? "encoding" : live?.phase ?? "";
    this.root.dataset.run = s.run;
    if (rebuildGallery) this.renderGallery();
    this.requestDraw();
  }

  keepCheckpoint(step) {
    const ckpts = this.state.checkpoints;
    if (!ckpts.length) return `step ${step} (no checkpoint there yet)`;
    const best = ckpts.reduce((a, c) => (Math.abs(c.step - step) < Math.abs(a.step - step) ? c : a), ckpts[0]);
    return best.lora;
  }

  renderGallery() {
    const s = this.state;
    const steps = [...s.samples.keys()].sort((a, b) => b - a); // newest first
    if (!steps.length) {
      this.gallery.replaceChildren(
        el("div", { class: "klein-panel-empty" }, ["Validation previews appear here every sample_every steps."]),
      );
      return;
    }
    const rows = steps.map((step) => {
      const pick = (which) => {
        const b = this.button(which.toUpperCase(), `klein-panel-pick-${which}`, () => {
          this.ab[which] = this.ab[which] === step ? null : step;
          this.renderGallery();
          if (this.ab.a !== null && this.ab.b !== null) this.showCompare();
        });
        b.ariaPressed = String(this.ab[which] === step);
        return b;
      };
      const label = step === 0 ? "step 0 (base)" : `step ${step}`;
      const cells = (s.samples.get(step) ?? []).filter(Boolean).map((entry) => {
        const caption = `${label} · ${entry.text}`;
        const cell = el("div", { class: "klein-panel-cell", "data-testid": "klein-panel-cell", title: caption }, [
          el("img", { src: viewURL(entry.image), alt: caption, draggable: false }),
          el("span", { "data-testid": "klein-panel-cell-label" }, [caption]),
        ]);
        cell.addEventListener("click", () => this.showBig([[entry, caption]]));
        return cell;
      });
      const head = el("div", { class: "klein-panel-step" }, [label, pick("a"), pick("b")]);
      const row = el("div", { class: "klein-panel-row", "data-testid": "klein-panel-row", dataset: { step: String(step) } }, [
        head,
        ...cells,
      ]);
      row.classList.toggle("is-mark", s.mark?.step === step);
      return row;
    });
    this.gallery.replaceChildren(...rows);
  }

  showBig(figures) {
    const pair = el(
      "div",
      { class: "klein-panel-pair" },
      figures.map(([entry, caption]) =>
        el("figure", {}, [el("img", { src: viewURL(entry.image), alt: caption }), el("figcaption", {}, [caption])]),
      ),
    );
    this.big.replaceChildren(pair);
    this.big.hidden = false;
  }

  /** A/B: the two picked steps side by side, one pair per prompt (the first prompt large; click a cell for more). */
  showCompare() {
    const { a, b } = this.ab;
    const A = this.state.samples.get(a) ?? [];
    const B = this.state.samples.get(b) ?? [];
    const figures = [];
    for (let i = 0; i < Math.max(A.length, B.length); i++) {
      if (A[i] && B[i]) {
        figures.push([A[i], `A: step ${a} · ${A[i].text}`], [B[i], `B: step ${b} · ${B[i].text}`]);
        break;
      }
    }
    if (figures.length) this.showBig(figures);
  }

  requestDraw() {
    if (this.drawPending) return;
    this.drawPending = true;
    requestAnimationFrame(() => {
      this.drawPending = false;
      this.draw();
    });
  }

  xRange() {
    const steps = [...this.state.points.keys(), ...this.state.clinic.keys()];
    const hi = Math.max(1, ...steps);
    return [0, hi];
  }

  /** Size the canvas's backing store to its CSS box (sharp on any pixel ratio); drawing is in CSS pixels. */
  fitCanvas(canvas) {
    const ratio = window.devicePixelRatio || 1;
    const width = Math.max(200, Math.floor(canvas.clientWidth || 400));
    const height = Number(canvas.dataset.h);
    canvas.style.height = `${height}px`;
    if (canvas.width !== Math.round(width * ratio)) canvas.width = Math.round(width * ratio);
    if (canvas.height !== Math.round(height * ratio)) canvas.height = Math.round(height * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    return { ctx, width, height };
  }

  frame(width, height) {
    return { left: 46, right: width - 8, top: 8, bottom: height - 18 };
  }

  draw() {
    this.drawLoss();
    this.drawClinic();
  }

  drawLoss() {
    const canvas = this.lossCanvas;
    const { ctx, width, height } = this.fitCanvas(canvas);
    ctx.clearRect(0, 0, width, height);
    const f = this.frame(width, height);
    const s = this.state;
    const steps = [...s.points.keys()].sort((a, b) => a - b);
    const losses = steps.map((k) => s.points.get(k)[0]);
    const vals = steps.filter((k) => s.points.get(k)[1] != null).map((k) => [k, s.points.get(k)[1]]);
    canvas.dataset.points = String(steps.length);
    canvas.dataset.scale = this.scale;
    const [x0, x1] = this.xRange();
    const log = this.scale === "log";
    const tr = (v) => (log ? Math.log10(Math.max(v, 1e-12)) : v);
    const ys = [...losses, ...vals.map((v) => v[1])].filter((v) => Number.isFinite(v) && (!log || v > 0)).map(tr);
    let [lo, hi] = ys.length ? [Math.min(...ys), Math.max(...ys)] : [0, 1];
    if (hi === lo) [lo, hi] = [lo - 0.5, hi + 0.5];
    const px = (x) => f.left + ((x - x0) / (x1 - x0 || 1)) * (f.right - f.left);
    const py = (v) => f.bottom - ((tr(v) - lo) / (hi - lo)) * (f.bottom - f.top);
    this.axes(ctx, f, x0, x1, lo, hi, log);
    for (const c of s.checkpoints) {
      ctx.strokeStyle = "#4ae28c";
      ctx.beginPath();
      ctx.moveTo(px(c.step), f.bottom);
      ctx.lineTo(px(c.step), f.bottom - 8);
      ctx.stroke();
    }
    this.markLine(ctx, f, px);
    this.line(ctx, steps.map((k, i) => [px(k), py(losses[i])]), "#6c7a89", 1);
    const smooth = ema(losses);
    this.line(ctx, steps.map((k, i) => [px(k), py(smooth[i])]), "#e8e8e8", 2);
    this.line(ctx, vals.map(([k, v]) => [px(k), py(v)]), "#ffaa3c", 2, true);
    this.hoverLine(ctx, f, px);
    if (!steps.length) this.emptyText(ctx, f, "The loss curve draws here while the run trains.");
  }

  drawClinic() {
    const canvas = this.clinicCanvas;
    const { ctx, width, height } = this.fitCanvas(canvas);
    ctx.clearRect(0, 0, width, height);
    const f = this.frame(width, height);
    const s = this.state;
    const steps = [...s.clinic.keys()].sort((a, b) => a - b);
    canvas.dataset.points = String(steps.length);
    const [x0, x1] = this.xRange();
    const values = steps.flatMap((k) => CLINIC_SERIES.map(([key]) => s.clinic.get(k)[key])).filter(Number.isFinite);
    const lo = Math.min(0, ...values);
    const hi = Math.max(1, ...values);
    const px = (x) => f.left + ((x - x0) / (x1 - x0 || 1)) * (f.right - f.left);
    const py = (v) => f.bottom - ((v - lo) / (hi - lo)) * (f.bottom - f.top);
    this.axes(ctx, f, x0, x1, lo, hi, false);
    ctx.setLineDash([3, 4]);
    for (const [level, colour] of THRESHOLDS) {
      ctx.strokeStyle = colour;
      ctx.beginPath();
      ctx.moveTo(f.left, py(level));
      ctx.lineTo(f.right, py(level));
      ctx.stroke();
    }
    ctx.setLineDash([]);
    this.markLine(ctx, f, px);
    for (const [key, , colour] of CLINIC_SERIES) {
      const pts = steps.filter((k) => Number.isFinite(s.clinic.get(k)[key])).map((k) => [px(k), py(s.clinic.get(k)[key])]);
      this.line(ctx, pts, colour, 2, true);
    }
    this.hoverLine(ctx, f, px);
    if (!steps.length) {
      this.emptyText(ctx, f, "The clinic's curves (measured at each validation against the base model) draw here.");
    }
  }

  axes(ctx, f, x0, x1, lo, hi, log) {
    ctx.font = "10px sans-serif";
    ctx.fillStyle = "#9aa3ad";
    ctx.strokeStyle = "#2b3038";
    ctx.lineWidth = 1;
    for (let i = 0; i <= 3; i++) {
      const v = lo + ((hi - lo) * i) / 3;
      const y = f.bottom - ((v - lo) / (hi - lo)) * (f.bottom - f.top);
      ctx.beginPath();
      ctx.moveTo(f.left, y);
      ctx.lineTo(f.right, y);
      ctx.stroke();
      const label = log ? `1e${v.toFixed(1)}` : Math.abs(v) < 10 ? v.toFixed(2) : v.toFixed(0);
      ctx.fillText(label, 2, y + 3);
    }
    for (let i = 0; i <= 4; i++) {
      const x = x0 + ((x1 - x0) * i) / 4;
      ctx.fillText(String(Math.round(x)), f.left + ((x - x0) / (x1 - x0 || 1)) * (f.right - f.left) - 6, f.bottom + 12);
    }
  }

  markLine(ctx, f, px) {
    const mark = this.state.mark;
    if (!mark) return;
    ctx.strokeStyle = "#ffd250";
    ctx.lineWidth = 2;
    ctx.beginPath();
    ctx.moveTo(px(mark.step), f.top);
    ctx.lineTo(px(mark.step), f.bottom);
    ctx.stroke();
    ctx.lineWidth = 1;
  }

  hoverLine(ctx, f, px) {
    if (this.hoverStep === null) return;
    ctx.strokeStyle = "rgba(255,255,255,0.4)";
    ctx.beginPath();
    ctx.moveTo(px(this.hoverStep), f.top);
    ctx.lineTo(px(this.hoverStep), f.bottom);
    ctx.stroke();
  }

  line(ctx, pts, colour, width, dots = false) {
    if (!pts.length) return;
    ctx.strokeStyle = colour;
    ctx.fillStyle = colour;
    ctx.lineWidth = width;
    ctx.beginPath();
    pts.forEach(([x, y], i) => (i ? ctx.lineTo(x, y) : ctx.moveTo(x, y)));
    ctx.stroke();
    if (dots || pts.length === 1) for (const [x, y] of pts) ctx.fillRect(x - 2, y - 2, 4, 4);
    ctx.lineWidth = 1;
  }

  emptyText(ctx, f, text) {
    ctx.fillStyle = "#9aa3ad";
    ctx.font = "11px sans-serif";
    ctx.fillText(text, f.left + 6, (f.top + f.bottom) / 2);
  }

  /** Hover: the nearest step with a point, its values in the readout (both charts share the step axis). */
  onHover(event, canvas) {
    const rect = canvas.getBoundingClientRect();
    const f = this.frame(rect.width, rect.height);
    const [x0, x1] = this.xRange();
    const x = x0 + ((event.clientX - rect.left - f.left) / (f.right - f.left)) * (x1 - x0);
    const s = this.state;
    const candidates = canvas === this.clinicCanvas ? [...s.clinic.keys()] : [...s.points.keys()];
    if (!candidates.length) return;
    const step = candidates.reduce((a, k) => (Math.abs(k - x) < Math.abs(a - x) ? k : a), candidates[0]);
    this.hoverStep = step;
    const parts = [`step ${step}`];
    const point = s.points.get(step);
    if (point) {
      const steps = [...s.points.keys()].sort((a, b) => a - b);
      const smooth = ema(steps.map((k) => s.points.get(k)[0]));
      parts.push(`loss ${fmt(point[0])}`, `smoothed ${fmt(smooth[steps.indexOf(step)])}`);
      if (point[1] != null) parts.push(`val ${fmt(point[1])}`);
    }
    const record = s.clinic.get(step);
    if (record) for (const [key, label] of CLINIC_SERIES) parts.push(`${label} ${fmt(record[key])}`);
    this.hoverEl.textContent = parts.join(" · ");
    this.hoverEl.hidden = false;
    this.requestDraw();
  }

  destroy() {
    this.resize.disconnect();
  }
}

// --- presets: the values that will be used, shown in the widgets -----------------------------------------------
let presetsPromise = null;
function presets() {
  presetsPromise ??= api
    .fetchApi("/klein_lab/train/presets")
    .then((r) => (r.ok ? r.json() : {}))
    .catch(() => ({}));
  return presetsPromise;
}

/**
 * Fill rank/alpha/learning_rate/steps with the preset's values: a 0 ("the preset's") shows the value it stands for,
 * and picking another preset moves every value that still equals the previous preset's (or 0); a value the artist
 * typed stays. The values written are the ones training would use anyway, so saved workflows keep their meaning.
 */
async function attachPresetValues(node) {
  const table = await presets();
  const presetWidget = node.widgets?.find((w) => w.name === "preset");
  if (!presetWidget || !Object.keys(table).length) return;
  let current = presetWidget.value;
  const fill = (from, to) => {
    for (const name of PRESET_WIDGETS) {
      const widget = node.widgets.find((w) => w.name === name);
      if (!widget || to?.[name] === undefined) continue;
      if (widget.value === 0 || (from && widget.value === from[name])) widget.value = to[name];
    }
    node.setDirtyCanvas?.(true, true);
  };
  fill(null, table[current]);
  const callback = presetWidget.callback;
  presetWidget.callback = function (value) {
    const result = callback?.apply(this, arguments);
    fill(table[current], table[value]);
    current = value;
    return result;
  };
  node.kleinPresetSync = () => {
    current = presetWidget.value;
    fill(null, table[current]);
  };
}

// --- the panel on the node ----------------------------------------------------------------------------------
const panels = new Set();

function attachPanel(node) {
  if (node.kleinPanel) return node.kleinPanel;
  const panel = new TrainPanel(node);
  node.kleinPanel = panel;
  panels.add(panel);
  const widget = node.addDOMWidget(WIDGET_NAME, "klein_train_panel", panel.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => MIN_HEIGHT_PX,
  });
  widget.serialize = false;
  const size = node.computeSize?.() ?? node.size;
  node.setSize?.([Math.max(node.size?.[0] ?? 0, 560), Math.max(size[1], node.size?.[1] ?? 0)]);
  const runWidget = panel.widget("run_name");
  if (runWidget) {
    const callback = runWidget.callback;
    runWidget.callback = function () {
      const result = callback?.apply(this, arguments);
      panel.load();
      return result;
    };
  }
  const onConfigure = node.onConfigure;
  node.onConfigure = function () {
    const result = onConfigure?.apply(this, arguments);
    node.kleinPresetSync?.();
    panel.load(); // a loaded workflow's run name arrives here: show that run's history
    return result;
  };
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    panels.delete(panel);
    panel.destroy();
    return onRemoved?.apply(this, arguments);
  };
  attachPresetValues(node);
  setTimeout(() => panel.load(), 0); // after the widgets got their values
  return panel;
}

// ComfyUI may load this module twice (see js/klein_lora_lab.js): register once.
if (!(app.extensions ?? []).some((ext) => ext.name === PANEL_EXTENSION_NAME)) {
  for (const event of EVENTS) {
    const type = event.split(".").pop();
    api.addEventListener(event, ({ detail }) => {
      for (const panel of panels) panel.onEvent(type, detail);
    });
  }
  // After a reconnect the page may have missed events: read the history again.
  api.addEventListener("reconnected", () => {
    for (const panel of panels) panel.load();
  });
  app.registerExtension({
    name: PANEL_EXTENSION_NAME,
    nodeCreated(node) {
      const comfyClass = node.comfyClass ?? node.constructor?.comfyClass;
      if (comfyClass === PANEL_NODE_CLASS || comfyClass === SWEEP_NODE_CLASS) attachPanel(node);
    },
  });
}
