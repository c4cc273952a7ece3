// tumorseg serve: front-end. Plain ES module, no build step, no network access
// beyond this server's own /api and /static paths.

const POLL_MS = 500;
const MAX_POLL_FAILURES = 6; // consecutive network failures before giving up
const TRUTH_OPACITY = 0.5;
const ACCEPTED = /\.(zip|tiff?|png|nii|nii\.gz|dcm)$/i;
// DICOM files often have no suffix, or are named by their UID (1.2.840...): the server
// tells them by their content.
const MAYBE_DICOM = /^[^.]+$|^[0-9.]+$/;
const UNCERTAIN_OPACITY = 0.6;
const MAX_FOLDER_FILES = 2000;

const $ = (id) => document.getElementById(id);

const el = {
  form: $("upload-form"),
  dropzone: $("dropzone"),
  files: $("files"),
  selection: $("selection"),
  selectionCount: $("selection-count"),
  fileList: $("file-list"),
  clear: $("clear"),
  submit: $("submit"),
  status: $("status"),
  progress: $("progress"),
  results: $("results"),
  caseName: $("case-name"),
  volume: $("volume"),
  tumourSlices: $("tumour-slices"),
  diceRow: $("dice-row"),
  dice: $("dice"),
  removed: $("removed"),
  download: $("download"),
  frame: $("viewer-frame"),
  canvas: $("viewer"),
  placeholder: $("viewer-placeholder"),
  controls: $("controls"),
  slice: $("slice"),
  sliceValue: $("slice-value"),
  opacity: $("opacity"),
  opacityValue: $("opacity-value"),
  showMask: $("show-mask"),
  showTruth: $("show-truth"),
  truthControl: $("truth-control"),
  showUncertain: $("show-uncertain"),
  uncertainControl: $("uncertain-control"),
  qcBanner: $("qc-banner"),
};

// ---------------------------------------------------------------- state

let selected = []; // File objects chosen by the user
let jobToken = 0; // increases with every submission; stale polls/loads check it
let busy = false;

const viewer = {
  nv: null, // Niivue instance, once attached
  ready: null, // Promise<boolean>: true when niivue is attached to a WebGL2 canvas
  error: null, // message when the viewer cannot work
  hasTruth: false,
  uncertainIndex: -1, // index of the uncertain-voxel overlay among the loaded volumes
  nSlices: 0,
  affineInv: null, // inverse of the image's voxel->mm affine (3x3 + translation)
  affine: null,
  dims: null,
};

function setState(state) {
  document.body.dataset.state = state;
}

function setStatus(text, kind = "") {
  el.status.textContent = text;
  el.status.className = "status" + (kind ? " " + kind : "");
}

function setProgress(value) {
  const v = Number(value);
  el.progress.value = Number.isFinite(v) ? Math.min(1, Math.max(0, v)) : 0;
}

// ---------------------------------------------------------------- selection

// One entry per file name (the server tells the files apart by name): choosing or
// dropping a file whose name is already in the selection replaces the earlier one.
function addFiles(files) {
  for (const f of files) {
    if (!f || !f.name) continue;
    const at = selected.findIndex((s) => s.name === f.name);
    if (at >= 0) selected[at] = f;
    else selected.push(f);
  }
  renderSelection();
}

function removeFile(index) {
  selected.splice(index, 1);
  renderSelection();
}

function syncInput() {
  // Mirror the selection into the <input type=file> where the browser allows it.
  try {
    const dt = new DataTransfer();
    for (const f of selected) dt.items.add(f);
    el.files.files = dt.files;
  } catch {
    /* older browsers: the JS selection is what gets sent anyway */
  }
}

function formatBytes(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1024 * 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MB`;
  return `${(n / 1024 / 1024 / 1024).toFixed(2)} GB`;
}

function renderSelection() {
  syncInput();
  el.fileList.replaceChildren();
  el.selection.hidden = selected.length === 0;
  const total = selected.reduce((s, f) => s + f.size, 0);
  el.selectionCount.textContent =
    selected.length === 1 ? `1 file, ${formatBytes(total)}` : `${selected.length} files, ${formatBytes(total)}`;
  selected.forEach((f, i) => {
    const li = document.createElement("li");
    const name = document.createElement("span");
    name.className = "file-name";
    name.textContent = f.name;
    if (!ACCEPTED.test(f.name) && !MAYBE_DICOM.test(f.name)) {
      name.classList.add("unexpected");
      name.title = "Not a .zip, .tif, .tiff, .png, .nii, .nii.gz or .dcm file";
    }
    const size = document.createElement("span");
    size.className = "file-size";
    size.textContent = formatBytes(f.size);
    const rm = document.createElement("button");
    rm.type = "button";
    rm.className = "remove";
    rm.textContent = "\u00d7";
    rm.setAttribute("aria-label", `Remove ${f.name}`);
    rm.addEventListener("click", () => removeFile(i));
    li.append(name, size, rm);
    el.fileList.append(li);
  });
  updateSubmit();
}

function updateSubmit() {
  el.submit.disabled = busy;
}

// Dropped folders: walk them with the entries API (Chromium, Firefox, Safari).
async function filesFromDataTransfer(dt) {
  const items = dt.items ? Array.from(dt.items) : [];
  const entries = items
    .filter((it) => it.kind === "file")
    .map((it) => (typeof it.webkitGetAsEntry === "function" ? it.webkitGetAsEntry() : null));
  if (entries.length === 0 || entries.some((e) => !e)) {
    return Array.from(dt.files || []);
  }
  const out = [];
  const fileOf = (entry) => new Promise((resolve, reject) => entry.file(resolve, reject));
  const readAll = async (dirEntry) => {
    const reader = dirEntry.createReader();
    const all = [];
    for (;;) {
      const batch = await new Promise((resolve, reject) => reader.readEntries(resolve, reject));
      if (!batch.length) break;
      all.push(...batch);
    }
    return all;
  };
  const walk = async (entry, depth) => {
    if (out.length >= MAX_FOLDER_FILES) return;
    if (entry.isFile) {
      const f = await fileOf(entry);
      // inside folders keep only files the server can use; skip e.g. .DS_Store
      if (depth === 0 || ACCEPTED.test(f.name) || MAYBE_DICOM.test(f.name)) out.push(f);
    } else if (entry.isDirectory && depth < 4) {
      const children = await readAll(entry);
      children.sort((a, b) => a.name.localeCompare(b.name, undefined, { numeric: true }));
      for (const c of children) await walk(c, depth + 1);
    }
  };
  for (const e of entries) await walk(e, 0);
  return out;
}

function setupDropzone() {
  const zone = el.dropzone;
  let depth = 0;
  zone.addEventListener("dragenter", (ev) => {
    ev.preventDefault();
    depth += 1;
    zone.classList.add("over");
  });
  zone.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    if (ev.dataTransfer) ev.dataTransfer.dropEffect = "copy";
  });
  zone.addEventListener("dragleave", () => {
    depth = Math.max(0, depth - 1);
    if (depth === 0) zone.classList.remove("over");
  });
  zone.addEventListener("drop", async (ev) => {
    ev.preventDefault();
    depth = 0;
    zone.classList.remove("over");
    if (!ev.dataTransfer) return;
    try {
      const files = await filesFromDataTransfer(ev.dataTransfer);
      if (files.length === 0) {
        setStatus("Nothing usable was dropped.", "error");
        return;
      }
      addFiles(files);
    } catch (err) {
      setStatus(`Could not read the dropped files: ${err && err.message ? err.message : err}`, "error");
    }
  });
  // A file dropped anywhere else must not make the browser navigate away.
  for (const type of ["dragover", "drop"]) {
    window.addEventListener(type, (ev) => {
      if (!zone.contains(ev.target)) ev.preventDefault();
    });
  }
  el.files.addEventListener("change", () => {
    const chosen = Array.from(el.files.files || []);
    addFiles(chosen);
  });
  el.clear.addEventListener("click", () => {
    selected = [];
    renderSelection();
  });
}

// ---------------------------------------------------------------- API

function detailOf(body, response) {
  if (body && typeof body === "object" && "detail" in body) {
    const d = body.detail;
    if (typeof d === "string") return d;
    if (Array.isArray(d)) {
      // FastAPI validation errors: [{loc, msg, type}, ...]
      const msgs = d.map((x) => (x && typeof x === "object" ? x.msg || JSON.stringify(x) : String(x)));
      return msgs.join("; ");
    }
    return JSON.stringify(d);
  }
  if (response) return `The server answered ${response.status} ${response.statusText}.`.replace(" .", ".");
  return "Unexpected answer from the server.";
}

async function readJson(response) {
  const text = await response.text();
  if (!text) return null;
  try {
    return JSON.parse(text);
  } catch {
    return null;
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

function describeJob(job) {
  if (job.stage) return job.stage;
  if (job.status === "queued") return "Waiting for the model";
  if (job.status === "running") return "Working";
  return job.status || "";
}

async function submit(ev) {
  if (ev) ev.preventDefault();
  if (busy) return;
  let files = selected.length ? selected : Array.from(el.files.files || []);
  if (files.length === 0) {
    setStatus("Choose a scan first: a .zip, slice images or NIfTI files.", "error");
    el.files.focus();
    return;
  }
  const token = ++jobToken;
  busy = true;
  updateSubmit();
  setState("working");
  el.results.hidden = true;
  el.frame.classList.add("stale");
  el.controls.disabled = true;
  setProgress(0);
  setStatus(files.length === 1 ? "Uploading 1 file" : `Uploading ${files.length} files`);

  try {
    const form = new FormData();
    for (const f of files) form.append("files", f, f.name);
    let response;
    try {
      response = await fetch("/api/predict", { method: "POST", body: form });
    } catch (err) {
      throw new Error("Could not reach the tumorseg server. Is it still running?");
    }
    const body = await readJson(response);
    if (!response.ok) throw new Error(detailOf(body, response));
    if (!body || !body.id) throw new Error("The server did not return a job id.");
    const statusUrl = body.status_url || `/api/jobs/${encodeURIComponent(body.id)}`;
    setStatus(describeJob(body));

    const job = await poll(statusUrl, token);
    if (token !== jobToken) return;
    if (job.status === "failed") throw new Error(job.error || "The segmentation failed.");
    if (!job.result) throw new Error("The job finished without a result.");
    setProgress(1);
    showResult(job.result);
    await showViewer(job.result, token);
  } catch (err) {
    if (token !== jobToken) return;
    setStatus(err && err.message ? err.message : String(err), "error");
    setState("error");
  } finally {
    if (token === jobToken) {
      busy = false;
      updateSubmit();
    }
  }
}

async function poll(url, token) {
  let failures = 0;
  for (;;) {
    if (token !== jobToken) return { status: "cancelled" };
    let response;
    let body;
    try {
      response = await fetch(url, { cache: "no-store" });
      body = await readJson(response);
    } catch {
      failures += 1;
      if (failures >= MAX_POLL_FAILURES) throw new Error("Lost contact with the tumorseg server.");
      await sleep(POLL_MS);
      continue;
    }
    if (!response.ok) {
      // 5xx may be transient; 4xx (e.g. 404 unknown job) is not.
      if (response.status >= 500 && failures + 1 < MAX_POLL_FAILURES) {
        failures += 1;
        await sleep(POLL_MS);
        continue;
      }
      throw new Error(detailOf(body, response));
    }
    failures = 0;
    if (!body || typeof body !== "object") throw new Error("Unexpected answer from the server.");
    if (token !== jobToken) return body;
    setProgress(body.progress);
    if (body.status === "done" || body.status === "failed") return body;
    const pct = Number.isFinite(Number(body.progress)) ? ` (${Math.round(100 * Number(body.progress))}%)` : "";
    setStatus(describeJob(body) + (body.status === "running" ? pct : ""));
    await sleep(POLL_MS);
  }
}

// ---------------------------------------------------------------- results

function showResult(r) {
  el.caseName.textContent = r.name ? `\u2013 ${r.name}` : "";
  el.volume.textContent =
    r.volume_ml !== null && r.volume_ml !== undefined && Number.isFinite(Number(r.volume_ml))
      ? `${Number(r.volume_ml).toFixed(2)} mL`
      : `${r.tumour_pixels} pixels`;
  el.tumourSlices.textContent = `${r.tumour_slices} of ${r.slices} slices`;
  if (r.dice !== null && r.dice !== undefined && Number.isFinite(Number(r.dice))) {
    el.dice.textContent = Number(r.dice).toFixed(3);
    el.diceRow.hidden = false;
  } else {
    el.dice.textContent = "";
    el.diceRow.hidden = true;
  }
  el.removed.textContent = `${r.removed_pixels} pixels`;
  const qc = r.qc || null;
  document.body.dataset.qc = qc && qc.flag ? qc.flag : "none";
  if (qc && qc.flag === "review") {
    el.qcBanner.textContent = `Review this result: ${qc.reason}.`;
    el.qcBanner.hidden = false;
  } else {
    el.qcBanner.textContent = "";
    el.qcBanner.hidden = true;
  }
  if (r.download) {
    el.download.href = r.download;
    el.download.setAttribute("download", r.download_name || "");
    el.download.hidden = false;
  } else {
    el.download.removeAttribute("href");
    el.download.hidden = true;
  }
  el.results.hidden = false;
}

// ---------------------------------------------------------------- viewer

function webgl2Available() {
  try {
    const c = document.createElement("canvas");
    return !!c.getContext("webgl2");
  } catch {
    return false;
  }
}

async function initViewer() {
  if (!webgl2Available()) {
    viewer.error =
      "The viewer needs WebGL2, which this browser does not provide (try turning on hardware acceleration). Segmentation still works.";
    el.placeholder.textContent = "The viewer needs WebGL2, which this browser does not provide.";
    return false;
  }
  try {
    const { Niivue } = await import(new URL("./niivue/niivue.js", import.meta.url).href);
    const nv = new Niivue({
      sliceType: 0, // SLICE_TYPE.AXIAL; set again below via nv.sliceTypeAxial
      backColor: [0, 0, 0, 1],
      crosshairWidth: 0, // no crosshair in the 2-D view
      show3Dcrosshair: false,
      isColorbar: false,
      isOrientCube: false,
      showLegend: false,
      dragAndDropEnabled: false, // our own drop zone handles files
      loadingText: "",
      logLevel: "warn",
    });
    await nv.attachToCanvas(el.canvas);
    nv.setSliceType(nv.sliceTypeAxial);
    nv.onLocationChange = onLocationChange;
    viewer.nv = nv;
    return true;
  } catch (err) {
    const msg = err && err.message ? err.message : String(err);
    viewer.error = /webgl/i.test(msg)
      ? "The viewer needs WebGL2, which this browser does not provide. Segmentation still works."
      : `The viewer could not start: ${msg}`;
    el.placeholder.textContent = viewer.error;
    return false;
  }
}

// URL basename if it already looks like NIfTI, else a name that tells niivue the format.
function niftiName(url, fallback) {
  try {
    const path = new URL(url, window.location.href).pathname;
    const base = decodeURIComponent(path.split("/").pop() || "");
    if (/\.nii(\.gz)?$/i.test(base)) return base;
  } catch {
    /* fall through */
  }
  return `${fallback}.nii.gz`;
}

// ---- voxel index <-> niivue fractional position, through the image's affine, so a
// flipped or permuted affine still lands on the right slice.

function invert3(m) {
  const [a, b, c] = m[0];
  const [d, e, f] = m[1];
  const [g, h, i] = m[2];
  const A = e * i - f * h;
  const B = -(d * i - f * g);
  const C = d * h - e * g;
  const det = a * A + b * B + c * C;
  if (!Number.isFinite(det) || Math.abs(det) < 1e-12) return null;
  return [
    [A / det, -(b * i - c * h) / det, (b * f - c * e) / det],
    [B / det, (a * i - c * g) / det, -(a * f - c * d) / det],
    [C / det, -(a * h - b * g) / det, (a * e - b * d) / det],
  ];
}

function rememberGeometry(vol) {
  viewer.affine = null;
  viewer.affineInv = null;
  viewer.dims = null;
  try {
    const dims = vol.hdr && vol.hdr.dims;
    if (dims && dims[3] > 0) viewer.dims = [dims[1], dims[2], dims[3]];
    const A = vol.hdr && vol.hdr.affine;
    if (A && A.length >= 3 && typeof vol.convertMM2Frac === "function") {
      const m = [0, 1, 2].map((r) => [0, 1, 2].map((c) => Number(A[r][c])));
      const t = [0, 1, 2].map((r) => Number(A[r][3]));
      const inv = invert3(m);
      if (inv && t.every(Number.isFinite)) {
        viewer.affine = { m, t };
        viewer.affineInv = inv;
      }
    }
  } catch {
    viewer.affine = null;
  }
}

function sliceToFracZ(k) {
  const nv = viewer.nv;
  const n = viewer.nSlices;
  const simple = (k + 0.5) / n;
  if (!viewer.affine || !viewer.dims || !nv.volumes.length) return simple;
  const { m, t } = viewer.affine;
  const v = [(viewer.dims[0] - 1) / 2, (viewer.dims[1] - 1) / 2, k];
  const mm = [0, 1, 2].map((r) => m[r][0] * v[0] + m[r][1] * v[1] + m[r][2] * v[2] + t[r]);
  const frac = nv.volumes[0].convertMM2Frac(mm, true);
  const z = Number(frac[2]);
  return Number.isFinite(z) && z >= 0 && z <= 1 ? z : simple;
}

function mmToSlice(mm) {
  if (!viewer.affine) return null;
  const { t } = viewer.affine;
  const inv = viewer.affineInv;
  const d = [mm[0] - t[0], mm[1] - t[1], mm[2] - t[2]];
  const k = inv[2][0] * d[0] + inv[2][1] * d[1] + inv[2][2] * d[2];
  return Number.isFinite(k) ? Math.round(k) : null;
}

function clampSlice(k) {
  const n = viewer.nSlices;
  return Math.min(n - 1, Math.max(0, Math.round(Number(k) || 0)));
}

function updateSliceLabel(k) {
  el.sliceValue.textContent = `${k + 1} of ${viewer.nSlices}`;
  el.slice.setAttribute("aria-valuetext", `Slice ${k + 1} of ${viewer.nSlices}`);
}

function goToSlice(k) {
  const nv = viewer.nv;
  if (!nv || !nv.volumes.length || viewer.nSlices < 1) return;
  k = clampSlice(k);
  const z = sliceToFracZ(k);
  const pos = nv.scene.crosshairPos;
  if (pos && pos.length === 3) {
    pos[2] = z; // keep in-plane position, change the axial slice
  } else {
    nv.scene.crosshairPos = [0.5, 0.5, z];
  }
  nv.drawScene();
  el.slice.value = String(k);
  updateSliceLabel(k);
}

function onLocationChange(loc) {
  // Fired by niivue when the user scrolls or clicks in the canvas.
  if (!viewer.nv || viewer.nSlices < 1 || !loc) return;
  let k = null;
  if (loc.mm) k = mmToSlice(loc.mm);
  if (k === null && loc.frac) k = Math.floor(Number(loc.frac[2]) * viewer.nSlices);
  if (k === null || !Number.isFinite(k)) return;
  k = clampSlice(k);
  if (String(k) !== el.slice.value) {
    el.slice.value = String(k);
    updateSliceLabel(k);
  }
}

function maskOpacity() {
  return el.showMask.checked ? Number(el.opacity.value) : 0;
}

function truthOpacity() {
  return viewer.hasTruth && el.showTruth.checked ? TRUTH_OPACITY : 0;
}

function uncertainOpacity() {
  return viewer.uncertainIndex > 0 && el.showUncertain.checked ? UNCERTAIN_OPACITY : 0;
}

function applyOverlayOpacity() {
  const nv = viewer.nv;
  if (!nv) return;
  if (nv.volumes.length > 1) nv.setOpacity(1, maskOpacity());
  if (viewer.hasTruth && nv.volumes.length > 2) nv.setOpacity(2, truthOpacity());
  if (viewer.uncertainIndex > 0 && nv.volumes.length > viewer.uncertainIndex) {
    nv.setOpacity(viewer.uncertainIndex, uncertainOpacity());
  }
}

async function showViewer(r, token) {
  const ok = await viewer.ready;
  if (token !== jobToken) return;
  if (!ok || !viewer.nv) {
    setStatus(`Done. ${viewer.error || "The viewer is not available."}`, "error");
    el.frame.classList.remove("stale");
    document.body.dataset.viewer = "unavailable";
    setState("error");
    return;
  }
  const v = r.viewer || {};
  if (!v.image || !v.mask) throw new Error("The result has no volumes to show.");
  const nv = viewer.nv;
  viewer.hasTruth = !!v.truth;
  el.truthControl.hidden = !viewer.hasTruth;
  el.showTruth.disabled = !viewer.hasTruth;

  setStatus("Loading the viewer");
  // Masks are 0/1: with cal_min 0.5 .. cal_max 1 the value 1 gets the full colour and
  // 0 falls below the threshold, which niivue draws fully transparent for overlays.
  const list = [
    { url: v.image, name: niftiName(v.image, "image"), colormap: "gray", opacity: 1 },
    { url: v.mask, name: niftiName(v.mask, "mask"), colormap: "red", opacity: maskOpacity(), cal_min: 0.5, cal_max: 1 },
  ];
  if (v.truth) {
    list.push({ url: v.truth, name: niftiName(v.truth, "truth"), colormap: "green", opacity: truthOpacity(), cal_min: 0.5, cal_max: 1 });
  }
  viewer.uncertainIndex = v.uncertain ? list.length : -1;
  el.uncertainControl.hidden = !v.uncertain;
  if (v.uncertain) {
    list.push({ url: v.uncertain, name: niftiName(v.uncertain, "uncertain"), colormap: "blue", opacity: uncertainOpacity(), cal_min: 0.5, cal_max: 1 });
  }
  try {
    await nv.loadVolumes(list);
  } catch (err) {
    throw new Error(`The viewer could not load the volumes: ${err && err.message ? err.message : err}`);
  }
  if (token !== jobToken) return;

  const back = nv.volumes[0];
  rememberGeometry(back);
  const n = viewer.dims ? viewer.dims[2] : Number(r.slices) || 1;
  viewer.nSlices = Math.max(1, n);
  el.slice.min = "0";
  el.slice.max = String(viewer.nSlices - 1);

  nv.setSliceType(nv.sliceTypeAxial);
  applyOverlayOpacity();
  nv.updateGLVolume();
  goToSlice(Number.isInteger(r.tumour_slice) ? r.tumour_slice : Math.floor(viewer.nSlices / 2));

  el.controls.disabled = false;
  el.showTruth.disabled = !viewer.hasTruth;
  el.showUncertain.disabled = viewer.uncertainIndex < 0;
  el.placeholder.hidden = true;
  el.frame.classList.remove("stale");
  // let the browser present the frame before telling anyone it is shown
  await new Promise((resolve) => requestAnimationFrame(() => requestAnimationFrame(resolve)));
  if (token !== jobToken) return;
  setStatus(`Done${r.name ? `: ${r.name}` : ""}.`, "ok");
  setState("shown");
}

function setupControls() {
  el.slice.addEventListener("input", () => goToSlice(Number(el.slice.value)));
  el.opacity.addEventListener("input", () => {
    el.opacityValue.textContent = Number(el.opacity.value).toFixed(2);
    applyOverlayOpacity();
  });
  el.showMask.addEventListener("change", applyOverlayOpacity);
  el.showTruth.addEventListener("change", applyOverlayOpacity);
  el.showUncertain.addEventListener("change", applyOverlayOpacity);
}

// ---------------------------------------------------------------- start

function start() {
  // read-only handle for debugging and browser tests: window.tumorseg.viewer.nv is the Niivue instance
  window.tumorseg = Object.freeze({ viewer });
  setState("idle");
  setupDropzone();
  setupControls();
  renderSelection();
  el.form.addEventListener("submit", submit);
  viewer.ready = initViewer();
  viewer.ready.then((ok) => {
    if (!ok && !busy && document.body.dataset.state === "idle") setStatus(viewer.error, "warn");
  });
}

start();
