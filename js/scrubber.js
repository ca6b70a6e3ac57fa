// Klein LoRA Lab scrubber: a DOM widget on KleinLabScrubRun / KleinLabMixerGrid that shows one frame of the
// node's result large, with its label, a slider over all frames (plus one per axis when several axes vary),
// arrow keys, a lazily loaded thumbnail strip and an A/B compare view.
//
// The node sends `output.klein_scrub[0]` = {version: 1, node, axes: [{name, values}], frames: [{index, coords,
// label, image, thumb}], grid}; image refs are {filename, subfolder, type} served by /view. The widget keeps the
// last meta, the current frame and the A/B choice in node.properties, so a saved workflow shows the same frame
// again after a reload without running the node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { el, injectStyle, viewURL } from "./dom.js";

export const SCRUB_EXTENSION_NAME = "KleinLoraLab.scrubber";
export const SCRUB_NODE_CLASSES = new Set(["KleinLabScrubRun", "KleinLabMixerGrid"]);
export const PROP_META = "klein_scrub_meta";
export const PROP_FRAME = "klein_scrub_frame";
export const PROP_AB = "klein_scrub_ab";

const WIDGET_NAME = "klein_scrub";
const THUMB_WIDTH_PX = 56; // fixed cell width: the strip's scroll position maps to a frame index
const THUMB_MARGIN_PX = 120; // thumbs this far outside the strip's view are loaded ahead of a scroll
const STAGE_MIN_PX = 240; // the frame view; the node can be resized larger
const MIN_HEIGHT_PX = STAGE_MIN_PX + 210; // + label, sliders, buttons, thumbnail strip
const COMPARE_MODES = ["off", "side", "wipe"];
const COMPARE_KEYS = ["a", "b", "mode", "wipe"];

const STYLE = `
.klein-scrub { display: flex; flex-direction: column; gap: 4px; box-sizing: border-box; width: 100%;
  height: 100%; min-height: ${MIN_HEIGHT_PX}px; padding: 4px; color: var(--input-text, #ddd);
  font: 12px sans-serif; outline: none; border-radius: 4px; }
.klein-scrub:focus-within { box-shadow: 0 0 0 1px var(--p-primary-color, #4a90e2) inset; }
.klein-scrub [hidden] { display: none !important; }
.klein-scrub-head { display: flex; justify-content: space-between; gap: 8px; min-height: 16px; }
.klein-scrub-label { font-weight: bold; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.klein-scrub-count { opacity: 0.7; white-space: nowrap; }
.klein-scrub-stage { position: relative; flex: 1 1 auto; min-height: ${STAGE_MIN_PX}px; display: flex; gap: 4px;
  background: #111; border-radius: 3px; overflow: hidden; }
.klein-scrub-pane { position: relative; flex: 1 1 0; min-width: 0; }
/* Absolute: the image never sizes the stage (the Vue renderer gives the widget no fixed height). */
.klein-scrub-pane img { position: absolute; inset: 0; width: 100%; height: 100%; object-fit: contain;
  display: block; user-select: none; -webkit-user-drag: none; }
.klein-scrub-stage.wipe .klein-scrub-pane-b { position: absolute; inset: 0; }
.klein-scrub-tag { position: absolute; top: 2px; padding: 1px 4px; background: rgba(0,0,0,0.65);
  border-radius: 3px; max-width: 48%; overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.klein-scrub-tag-a { left: 2px; } .klein-scrub-tag-b { right: 2px; }
.klein-scrub-empty { margin: auto; opacity: 0.7; text-align: center; padding: 8px; }
.klein-scrub-row { display: flex; align-items: center; gap: 6px; }
.klein-scrub-row > span { min-width: 96px; white-space: nowrap; overflow: hidden; text-overflow: ellipsis; }
.klein-scrub-row input[type=range] { flex: 1 1 auto; min-width: 40px; }
.klein-scrub-buttons { display: flex; gap: 4px; flex-wrap: wrap; }
.klein-scrub-buttons button { font-size: 11px; padding: 1px 6px; cursor: pointer; }
.klein-scrub-buttons button[aria-pressed=true] { outline: 1px solid var(--p-primary-color, #4a90e2); }
.klein-scrub-thumbs { display: flex; overflow-x: auto; overflow-y: hidden; gap: 0; min-height: 44px;
  flex: 0 0 auto; }
.klein-scrub-thumb { flex: 0 0 ${THUMB_WIDTH_PX}px; width: ${THUMB_WIDTH_PX}px; height: 40px; box-sizing: border-box;
  border: 2px solid transparent; background: #222; cursor: pointer; padding: 0; }
.klein-scrub-thumb.current { border-color: var(--p-primary-color, #4a90e2); }
.klein-scrub-thumb.is-a { border-bottom-color: #e2a84a; } .klein-scrub-thumb.is-b { border-top-color: #4ae28c; }
.klein-scrub-thumb img { width: 100%; height: 100%; object-fit: cover; display: block; pointer-events: none; }
`;


/** The problem with a meta object, or null when it can be shown. */
export function metaProblem(meta) {
  if (!meta || typeof meta !== "object") return "no result yet: run the node";
  if (meta.version !== 1) return `unknown klein_scrub version ${meta.version} (this widget reads version 1)`;
  if (!Array.isArray(meta.frames) || meta.frames.length === 0) return "the result has no frames";
  if (!Array.isArray(meta.axes)) return "the result has no axes list";
  return null;
}

/**
 * Index of frames by coords, and the axes that vary ordered fastest first. An axis's stride is how far apart
 * in the frame list two frames are that differ by one step on that axis only.
 */
export function indexFrames(meta) {
  const byCoords = new Map(meta.frames.map((frame, i) => [(frame.coords ?? []).join(","), i]));
  const varying = [];
  meta.axes.forEach((axis, a) => {
    if ((axis.values ?? []).length < 2) return;
    let stride = Infinity;
    meta.frames.forEach((frame, i) => {
      if (!frame.coords) return;
      const next = frame.coords.slice();
      next[a] += 1;
      const j = byCoords.get(next.join(","));
      if (j !== undefined) stride = Math.min(stride, Math.abs(j - i));
    });
    varying.push({ axis: a, stride });
  });
  varying.sort((x, y) => x.stride - y.stride);
  return { byCoords, varying: varying.map((v) => v.axis) };
}

class Scrubber {
  constructor(node) {
    this.node = node;
    this.meta = null;
    this.index = null;
    this.frame = 0;
    this.ab = { a: null, b: null, mode: "off", wipe: 50 };
    this.thumbs = [];
    this.axisSliders = [];
    this.marked = {}; // thumb marks (current, is-a, is-b) -> the frame index whose cell carries them
    this.scrollPending = false;
    this.problem = metaProblem(null);
    this.build();
  }

  // --- DOM ------------------------------------------------------------------------------------------------
  build() {
    injectStyle("klein-scrub-style", STYLE);
    this.label = el("div", { class: "klein-scrub-label", "data-testid": "klein-scrub-label" });
    this.count = el("div", { class: "klein-scrub-count", "data-testid": "klein-scrub-count" });
    this.imgA = el("img", { class: "klein-scrub-image", "data-testid": "klein-scrub-image", alt: "", draggable: false });
    this.imgB = el("img", { class: "klein-scrub-image-b", "data-testid": "klein-scrub-image-b", alt: "", draggable: false });
    this.tagA = el("div", { class: "klein-scrub-tag klein-scrub-tag-a", "data-testid": "klein-scrub-a-label" });
    this.tagB = el("div", { class: "klein-scrub-tag klein-scrub-tag-b", "data-testid": "klein-scrub-b-label" });
    this.paneA = el("div", { class: "klein-scrub-pane klein-scrub-pane-a" }, [this.imgA, this.tagA]);
    this.paneB = el("div", { class: "klein-scrub-pane klein-scrub-pane-b" }, [this.imgB, this.tagB]);
    this.empty = el("div", { class: "klein-scrub-empty", "data-testid": "klein-scrub-empty" });
    this.stage = el("div", { class: "klein-scrub-stage", "data-testid": "klein-scrub-stage" }, [
      this.paneA,
      this.paneB,
      this.empty,
    ]);
    this.slider = el("input", {
      type: "range",
      class: "klein-scrub-slider",
      "data-testid": "klein-scrub-slider",
      min: "0",
      max: "0",
      step: "1",
      value: "0",
      "aria-label": "frame",
    });
    this.slider.addEventListener("input", () => this.show(Number(this.slider.value)));
    this.axisRows = el("div", { class: "klein-scrub-axes" });
    this.wipe = el("input", {
      type: "range",
      class: "klein-scrub-wipe",
      "data-testid": "klein-scrub-wipe",
      min: "0",
      max: "100",
      step: "1",
      value: "50",
      "aria-label": "wipe position",
    });
    this.wipe.addEventListener("input", () => {
      this.ab.wipe = Number(this.wipe.value);
      this.renderCompare();
      this.persist();
    });
    this.wipeRow = el("div", { class: "klein-scrub-row klein-scrub-wipe-row" }, [el("span", {}, ["A ◂ wipe ▸ B"]), this.wipe]);
    this.setA = this.button("Set A", "klein-scrub-set-a", () => this.setCompareFrame("a"));
    this.setB = this.button("Set B", "klein-scrub-set-b", () => this.setCompareFrame("b"));
    this.modeButtons = Object.fromEntries(
      COMPARE_MODES.map((mode) => [
        mode,
        this.button({ off: "Single", side: "A | B", wipe: "Wipe" }[mode], `klein-scrub-mode-${mode}`, () =>
          this.setMode(mode),
        ),
      ]),
    );
    this.thumbStrip = el("div", { class: "klein-scrub-thumbs", "data-testid": "klein-scrub-thumbs" });
    this.thumbStrip.addEventListener("click", (event) => {
      const cell = event.target.closest(".klein-scrub-thumb");
      if (cell) this.show(Number(cell.dataset.frame));
    });
    this.root = el(
      "div",
      { class: "klein-scrub", "data-testid": "klein-scrub", tabindex: "0", dataset: { nodeClass: this.node.comfyClass ?? "" } },
      [
        el("div", { class: "klein-scrub-head" }, [this.label, this.count]),
        this.stage,
        el("div", { class: "klein-scrub-row" }, [el("span", {}, ["frame"]), this.slider]),
        this.axisRows,
        el("div", { class: "klein-scrub-buttons" }, [this.setA, this.setB, ...Object.values(this.modeButtons)]),
        this.wipeRow,
        this.thumbStrip,
      ],
    );
    this.root.addEventListener("keydown", (event) => this.onKey(event));
    // Pointer events stay in the widget: a drag on a slider must not pan the canvas or move the node.
    for (const type of ["pointerdown", "pointermove", "pointerup", "wheel"]) {
      this.root.addEventListener(type, (event) => event.stopPropagation());
    }
    this.root.addEventListener("pointerdown", () => this.root.focus({ preventScroll: true }));
    this.observer = new IntersectionObserver((entries) => this.onThumbsVisible(entries), {
      root: this.thumbStrip,
      rootMargin: `0px ${THUMB_MARGIN_PX}px`,
    });
    this.render();
  }

  button(text, testid, onClick) {
    const button = el("button", { type: "button", class: testid, "data-testid": testid }, [text]);
    button.addEventListener("click", onClick);
    return button;
  }

  // --- state ----------------------------------------------------------------------------------------------
  /** Show a new result; keeps the current position when the same coordinates exist in it. */
  setMeta(meta, frame = null, ab = null) {
    const problem = metaProblem(meta);
    const oldCoords = this.meta?.frames[this.frame]?.coords;
    this.meta = problem ? null : meta;
    this.problem = problem;
    this.index = problem ? null : indexFrames(meta);
    if (ab) this.ab = { a: null, b: null, mode: "off", wipe: 50, ...ab };
    if (this.meta) {
      const n = this.meta.frames.length;
      const kept = oldCoords ? this.index.byCoords.get(oldCoords.join(",")) : undefined;
      this.frame = clamp(Number.isInteger(frame) ? frame : (kept ?? 0), 0, n - 1);
      for (const key of ["a", "b"]) if (!(Number.isInteger(this.ab[key]) && this.ab[key] < n)) this.ab[key] = null;
      if (!COMPARE_MODES.includes(this.ab.mode)) this.ab.mode = "off";
      if (this.ab.mode !== "off") this.fillCompare();
    }
    this.buildAxes();
    this.buildThumbs();
    this.render();
    this.persist(true);
  }

  show(frame) {
    if (!this.meta) return;
    this.frame = clamp(frame, 0, this.meta.frames.length - 1);
    // While comparing, B follows the slider and A stays pinned.
    if (this.ab.mode !== "off") this.ab.b = this.frame;
    this.render();
    this.persist();
  }

  setCompareFrame(which) {
    if (!this.meta) return;
    this.ab[which] = this.frame;
    this.render();
    this.persist();
  }

  setMode(mode) {
    if (!this.meta) return;
    this.ab.mode = mode;
    if (mode !== "off") this.fillCompare();
    this.render();
    this.persist();
  }

  /** Comparing needs both frames: an unset A is the first frame, an unset B the current one. */
  fillCompare() {
    this.ab.a ??= 0;
    this.ab.b ??= this.frame;
  }

  /** Write the position (and, after a new result, the meta) into node.properties, which the workflow saves. */
  persist(withMeta = false) {
    const props = (this.node.properties ??= {});
    // The meta can hold hundreds of frames and the Vue renderer observes properties: write it only when it changed.
    if (withMeta && this.meta && props[PROP_META] !== this.meta) props[PROP_META] = this.meta;
    if (props[PROP_FRAME] !== this.frame) props[PROP_FRAME] = this.frame;
    const ab = props[PROP_AB];
    if (!ab || COMPARE_KEYS.some((key) => ab[key] !== this.ab[key])) props[PROP_AB] = { ...this.ab };
  }

  /** Move `delta` steps along varying axis number `rank` (0 = fastest); stays put at the grid's edge. */
  step(rank, delta) {
    const axis = this.index.varying[rank];
    if (axis === undefined) return this.show(this.frame + delta);
    const coords = this.meta.frames[this.frame].coords.slice();
    coords[axis] += delta;
    const target = this.index.byCoords.get(coords.join(","));
    if (target !== undefined) this.show(target);
  }

  onKey(event) {
    if (!this.meta || event.target === this.wipe) return;
    const last = this.meta.frames.length - 1;
    // Up/Down walk the next axis (Left/Right walk every frame, so the fastest axis first); with one varying
    // axis they step frames like Left/Right.
    const upDownRank = this.index.varying.length > 1 ? 1 : 0;
    const actions = {
      ArrowLeft: () => this.show(this.frame - 1),
      ArrowRight: () => this.show(this.frame + 1),
      ArrowUp: () => this.step(upDownRank, 1),
      ArrowDown: () => this.step(upDownRank, -1),
      PageUp: () => this.step(2, 1),
      PageDown: () => this.step(2, -1),
      Home: () => this.show(0),
      End: () => this.show(last),
      a: () => this.setCompareFrame("a"),
      b: () => this.setCompareFrame("b"),
      c: () => this.setMode(COMPARE_MODES[(COMPARE_MODES.indexOf(this.ab.mode) + 1) % COMPARE_MODES.length]),
    };
    const action = actions[event.key];
    if (!action || event.ctrlKey || event.metaKey || event.altKey) return;
    // The keys belong to the widget: the canvas must not also act on them (and a focused range input must not
    // move a second time).
    event.preventDefault();
    event.stopPropagation();
    action();
  }

  // --- rendering ------------------------------------------------------------------------------------------
  buildAxes() {
    this.axisRows.replaceChildren();
    this.axisSliders = [];
    if (!this.meta || this.index.varying.length < 2) return;
    for (const a of this.index.varying) {
      const axis = this.meta.axes[a];
      const value = el("span", { class: "klein-scrub-axis-value", "data-testid": "klein-scrub-axis-value" });
      const slider = el("input", {
        type: "range",
        class: "klein-scrub-axis-slider",
        "data-testid": "klein-scrub-axis-slider",
        min: "0",
        max: String(axis.values.length - 1),
        step: "1",
        value: "0",
        "aria-label": axis.name,
        dataset: { axis: axis.name },
      });
      slider.addEventListener("input", () => {
        const coords = this.meta.frames[this.frame].coords.slice();
        coords[a] = Number(slider.value);
        const target = this.index.byCoords.get(coords.join(","));
        if (target !== undefined) this.show(target);
        else this.render(); // no frame there: snap the slider back
      });
      this.axisSliders.push({ axis: a, slider, value });
      this.axisRows.append(el("div", { class: "klein-scrub-row" }, [value, slider]));
    }
  }

  buildThumbs() {
    this.observer.disconnect();
    this.thumbStrip.replaceChildren();
    this.thumbs = [];
    this.marked = {};
    if (!this.meta) return;
    // One light cell per frame; the <img> inside exists only while the cell is near the visible part of the
    // strip, so hundreds of frames never mean hundreds of decoded images.
    const cells = this.meta.frames.map((frame, i) => {
      const cell = el("button", {
        type: "button",
        class: "klein-scrub-thumb",
        "data-testid": "klein-scrub-thumb",
        title: frame.label ?? `frame ${i}`,
        dataset: { frame: String(i) },
      });
      this.observer.observe(cell);
      return cell;
    });
    this.thumbStrip.append(...cells);
    this.thumbs = cells;
  }

  onThumbsVisible(entries) {
    for (const entry of entries) {
      const cell = entry.target;
      if (entry.isIntersecting && !cell.firstChild) {
        const frame = this.meta?.frames[Number(cell.dataset.frame)];
        if (frame) cell.append(el("img", { src: viewURL(frame.thumb ?? frame.image), alt: "", draggable: false, decoding: "async" }));
      } else if (!entry.isIntersecting && cell.firstChild) {
        cell.replaceChildren();
      }
    }
  }

  render() {
    const meta = this.meta;
    this.root.dataset.frame = meta ? String(this.frame) : "";
    this.empty.hidden = !!meta;
    this.empty.textContent = this.problem ?? "";
    for (const control of [this.slider, this.setA, this.setB, ...Object.values(this.modeButtons)]) {
      control.disabled = !meta;
    }
    if (!meta) {
      this.label.textContent = "";
      this.count.textContent = "";
      this.paneA.hidden = this.paneB.hidden = true;
      this.wipeRow.hidden = true;
      return;
    }
    const frame = meta.frames[this.frame];
    this.label.textContent = frame.label ?? `frame ${this.frame}`;
    this.count.textContent = `${this.frame + 1} / ${meta.frames.length}`;
    this.slider.max = String(meta.frames.length - 1);
    this.slider.value = String(this.frame);
    for (const { axis, slider, value } of this.axisSliders) {
      const coord = frame.coords[axis];
      slider.value = String(coord);
      value.textContent = `${meta.axes[axis].name} ${meta.axes[axis].values[coord]}`;
    }
    for (const [mode, button] of Object.entries(this.modeButtons)) button.ariaPressed = String(this.ab.mode === mode);
    this.renderThumbMarks();
    this.renderCompare();
  }

  renderCompare() {
    const meta = this.meta;
    if (!meta) return;
    const mode = this.ab.mode;
    this.stage.classList.toggle("wipe", mode === "wipe");
    this.stage.dataset.mode = mode;
    this.wipeRow.hidden = mode !== "wipe";
    this.wipe.value = String(this.ab.wipe);
    const a = mode === "off" ? this.frame : this.ab.a;
    setSrc(this.imgA, viewURL(meta.frames[a].image));
    this.tagA.hidden = mode === "off";
    this.tagA.textContent = `A: ${meta.frames[a].label ?? a}`;
    this.paneA.hidden = false;
    this.paneB.hidden = mode === "off";
    if (mode !== "off") {
      const b = this.ab.b;
      setSrc(this.imgB, viewURL(meta.frames[b].image));
      this.tagB.textContent = `B: ${meta.frames[b].label ?? b}`;
      // Wipe: B covers A right of the handle.
      this.paneB.style.clipPath = mode === "wipe" ? `inset(0 0 0 ${this.ab.wipe}%)` : "";
    }
  }

  renderThumbMarks() {
    const marks = { current: this.frame, "is-a": this.ab.a, "is-b": this.ab.b };
    for (const [cls, i] of Object.entries(marks)) {
      if (this.marked[cls] !== i) this.thumbs[this.marked[cls]]?.classList.remove(cls);
      if (i !== null) this.thumbs[i]?.classList.add(cls);
      this.marked[cls] = i;
    }
    // Scroll in the next animation frame: reading the strip's width right after the writes above would force
    // an extra layout of the whole page on every step.
    if (this.scrollPending) return;
    this.scrollPending = true;
    requestAnimationFrame(() => {
      this.scrollPending = false;
      this.scrollToCurrent();
    });
  }

  /** Keep the current thumb in view (not scrollIntoView, which would also scroll the page or the canvas). */
  scrollToCurrent() {
    const strip = this.thumbStrip;
    const left = this.frame * THUMB_WIDTH_PX;
    const width = strip.clientWidth;
    if (left < strip.scrollLeft) strip.scrollLeft = left;
    else if (left + THUMB_WIDTH_PX > strip.scrollLeft + width) strip.scrollLeft = left + THUMB_WIDTH_PX - width;
  }

  destroy() {
    this.observer.disconnect();
  }
}

function clamp(value, lo, hi) {
  return Math.min(hi, Math.max(lo, value));
}

function setSrc(img, url) {
  if (img.getAttribute("src") !== url) img.src = url;
}

/** Attach the scrubber widget to a node (once). */
function attachScrubber(node) {
  if (node.kleinScrub) return node.kleinScrub;
  const scrub = new Scrubber(node);
  node.kleinScrub = scrub;
  const widget = node.addDOMWidget(WIDGET_NAME, "klein_scrub", scrub.root, {
    serialize: false,
    hideOnZoom: false,
    getMinHeight: () => MIN_HEIGHT_PX,
  });
  // options.serialize keeps the widget out of the prompt; the node's widgets_values reads widget.serialize.
  widget.serialize = false;
  const size = node.computeSize?.() ?? node.size;
  node.setSize?.([Math.max(node.size?.[0] ?? 0, 460), Math.max(size[1], node.size?.[1] ?? 0)]);

  const onExecuted = node.onExecuted;
  node.onExecuted = function (output) {
    onExecuted?.apply(this, arguments);
    const meta = output?.klein_scrub?.[0];
    if (meta) scrub.setMeta(meta);
  };
  // A loaded workflow's properties arrive after nodeCreated: restore the last result and position from them.
  const onConfigure = node.onConfigure;
  node.onConfigure = function (info) {
    onConfigure?.apply(this, arguments);
    const props = this.properties ?? {};
    if (props[PROP_META]) scrub.setMeta(props[PROP_META], props[PROP_FRAME] ?? 0, props[PROP_AB] ?? null);
  };
  const onRemoved = node.onRemoved;
  node.onRemoved = function () {
    scrub.destroy();
    return onRemoved?.apply(this, arguments);
  };
  // Restore from properties set before the widget existed (e.g. a node pasted with its properties).
  if (node.properties?.[PROP_META]) {
    scrub.setMeta(node.properties[PROP_META], node.properties[PROP_FRAME] ?? 0, node.properties[PROP_AB] ?? null);
  }
  return scrub;
}

// ComfyUI may load this module twice (see js/klein_lora_lab.js): register once.
if (!(app.extensions ?? []).some((ext) => ext.name === SCRUB_EXTENSION_NAME)) {
  app.registerExtension({
    name: SCRUB_EXTENSION_NAME,
    nodeCreated(node) {
      const comfyClass = node.comfyClass ?? node.constructor?.comfyClass;
      if (SCRUB_NODE_CLASSES.has(comfyClass)) attachScrubber(node);
    },
  });
}
